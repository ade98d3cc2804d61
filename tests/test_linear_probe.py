"""probes.linear on synthetic activations whose answer is known: a layer that holds the label linearly
scores near 1, a layer of noise scores near chance (or R^2 near 0), the weights found point the right
way, the split is seeded and keeps groups whole; and on rows read back from a harvest."""
from __future__ import annotations

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.errors import InputError
from probes import linear


def synthetic(n: int = 2000, d: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(n, d, generator=g) * 3 + 5  # not centred, not unit scale: standardising must cope
    noise = torch.randn(n, d, generator=g)
    w_true = torch.randn(d, generator=g)
    return signal, noise, w_true, g


def test_logistic_probe_finds_a_linear_class_and_not_noise() -> None:
    signal, noise, w_true, _ = synthetic()
    centred = (signal - 5) / 3
    y = (centred @ w_true > 0).long() + 2 * (centred[:, 0] > 1).long()  # four classes, linearly separable
    result = linear.fit_per_layer({"signal": signal, "noise": noise}, y, seed=1)
    assert result.kind == "classes" and result.metric == "accuracy"
    assert result.n_test == 400 and result.n_train == 1600
    assert result.scores["signal"] > 0.95
    assert result.scores["noise"] < result.probes["noise"].baseline + 0.08
    probe = result.probes["signal"]
    assert probe.weight.shape == (12, 4) and probe.bias.shape == (4,)
    # The weights are in the original units: predicting on raw rows reproduces the held-out accuracy.
    _, test = linear.split(len(y), 0.2, 1)
    assert (probe.predict(signal[test]) == y[test]).double().mean().item() == pytest.approx(probe.score)


def test_ridge_probe_recovers_the_direction_and_scores_r2() -> None:
    signal, noise, w_true, g = synthetic()
    y = signal @ w_true + 0.05 * torch.randn(len(signal), generator=g) + 7
    result = linear.fit_per_layer({0: signal, 1: noise}, y, l2=1e-6)
    assert result.kind == "scalar" and result.metric == "R^2"
    assert result.scores[0] > 0.999 and result.scores[1] < 0.05
    probe = result.probes[0]
    assert torch.nn.functional.cosine_similarity(probe.weight, w_true, dim=0) > 0.999
    torch.testing.assert_close(probe.predict(signal), y, atol=0.3, rtol=0)


def test_the_split_is_seeded_and_keeps_groups_whole() -> None:
    a, b = linear.split(100, 0.3, seed=4), linear.split(100, 0.3, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and len(a[1]) == 30
    assert not torch.equal(a[1], linear.split(100, 0.3, seed=5)[1])
    groups = torch.arange(100) // 10
    train, test = linear.split(100, 0.3, seed=0, groups=groups)
    assert set(groups[train].tolist()).isdisjoint(groups[test].tolist()) and len(test) == 30
    with pytest.raises(InputError, match="test_fraction"):
        linear.split(10, 1.5)
    with pytest.raises(InputError, match="one label per row"):
        linear.fit(torch.zeros(5, 2), torch.zeros(4, dtype=torch.long), torch.arange(3), torch.arange(3, 5))


def test_probes_on_harvested_rows(tmp_path) -> None:
    """Whether a token starts a word, from a harvest's rows: the embedding carries the token, so even random
    weights let a probe read it at block 0's input."""
    from minigpt.harvest import harvest, read

    model = GPT.random(GPTConfig(n_layer=2, n_head=2, n_embd=64, n_positions=64), seed=0)
    words = "the river tower blue walks over under Paris city , . ( ) 1999 ok - re un".split()
    g = torch.Generator().manual_seed(0)
    # Words glued on or after a space, so that about half the tokens start a word.
    docs = ["".join(" " * int(s) + words[i] for i, s in zip(torch.randint(len(words), (60,), generator=g).tolist(),
                                                              torch.randint(2, (60,), generator=g).tolist()))
            for _ in range(20)]
    (tmp_path / "c.txt").write_text("\n".join(docs))
    harvest(model, tmp_path / "c.txt", "blocks.*.resid_pre", tmp_path / "h", context=32, lines=True, quiet=True)
    layers = {L: read(tmp_path / "h", f"blocks.{L}.resid_pre") for L in range(2)}
    tokens = layers[0].token.tolist()
    starts = torch.tensor([model.tokenizer.decode([t]).startswith(" ") for t in tokens]).long()
    result = linear.fit_per_layer(layers, starts, groups=layers[0].document, seed=0)
    assert result.probes[0].baseline < 0.8 and result.scores[0] > 0.9


@pytest.mark.parametrize("case, message", [
    ("labels short", "layer 'signal' has 200 rows but y has 199 labels"),
    ("labels long", "layer 'signal' has 200 rows but y has 201 labels"),
    ("one layer short", "layer 'noise' has 150 rows but y has 200 labels"),
    ("groups short", r"groups has shape \[199\] but y \[200\]"),
    ("groups 2-d", r"groups has shape \[200, 1\]"),
    ("labels 2-d", r"one label per row, shape \[N\]"),
])
def test_labels_or_groups_of_another_length_are_refused(case, message) -> None:
    signal, noise, w_true, _ = synthetic(n=200)
    layers = {"signal": signal, "noise": noise}
    y, groups = (signal @ w_true > 0).long(), torch.arange(200) // 10
    if case == "labels short":
        y = y[:-1]
    elif case == "labels long":
        y = torch.cat([y, y[:1]])
    elif case == "one layer short":
        layers["noise"] = noise[:150]
    elif case == "groups short":
        groups = groups[:-1]
    elif case == "groups 2-d":
        groups = groups[:, None]
    elif case == "labels 2-d":
        y = y[:, None]
    for max_rows in (None, 100):  # cutting to max_rows first would hide it
        with pytest.raises(InputError, match=message):
            linear.fit_per_layer(layers, y, groups=groups, max_rows=max_rows)
    with pytest.raises(InputError, match=r"groups must hold one value per row: shape \[10\], got \[9\]"):
        linear.split(10, 0.2, groups=torch.arange(9))
