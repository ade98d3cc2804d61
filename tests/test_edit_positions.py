"""Edit positions on batches of different lengths: each row gets what it gets run alone.

``patch``, ``zero_ablate`` and ``mean_ablate`` count ``positions`` in each row's real tokens (-1 and
"last" the last real token, negative slice bounds from the row's end), in the run and in a padded
source trace alike; edit functions may ask for the run's ``mask``. float64, against single runs.
"""
from __future__ import annotations

import pytest
import torch
from hf_reference import assert_close

from minigpt import GPT, EditError, GPTConfig, edits

CONFIG = GPTConfig(vocab_size=50, n_positions=12, n_embd=16, n_layer=3, n_head=4)
CLEAN = [[1, 7, 3, 9, 4, 2], [5, 5, 6], [8, 2, 4, 1]]
CORRUPT = [[3, 3, 9], [1, 4, 6, 7, 2, 2, 5], [8, 8, 1, 5]]
SAME_LENGTHS = [[4, 1, 2], [9, 9, 3, 3, 1, 6, 2], [7, 7, 7, 7]]  # a pattern's key axis must fit: same lengths
TAPS = ["blocks.1.resid_pre", "blocks.1.attn.z", "blocks.0.attn.pattern"]
POSITIONS = [-1, -2, "last", [0, -1], [-3, 1], slice(-2, None), slice(1, -1), slice(None, -2, 2), 0]


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT.random(CONFIG, seed=5, dtype=torch.float64)


def helper(kind: str, source, name: str, positions) -> edits.Edits:
    heads = [1, 3] if name.endswith(("attn.z", "attn.pattern")) else None
    if kind == "patch":
        return edits.patch(source, name, positions=positions, heads=heads)
    if kind == "zero":
        return edits.zero_ablate(name, positions=positions, heads=heads)
    return edits.mean_ablate(name, source, positions=positions, heads=heads)


def assert_rows_as_alone(model: GPT, kind: str, name: str, positions) -> None:
    """The ragged run with the edit, row by row, equals each row run alone with the same edit (its own
    source row alone for patching; the same source for mean ablation, whose mean is the batch's). Where
    a row alone is refused (a slice that picks other counts in the two runs), the batch is too."""
    sources = SAME_LENGTHS if name.endswith("pattern") else CLEAN
    _, clean = model.run(sources, taps=name)
    alone = []
    try:
        for row, tokens in enumerate(CORRUPT):
            source = model.run([sources[row]], taps=name)[1] if kind == "patch" else clean
            alone.append(model.run([tokens], taps=name, edits=helper(kind, source, name, positions)))
    except EditError:
        with pytest.raises(EditError, match="picks"):
            model.run(CORRUPT, taps=name, edits=helper(kind, clean, name, positions))
        return
    logits, trace = model.run(CORRUPT, taps=name, edits=helper(kind, clean, name, positions))
    for row, (alone_logits, alone_trace) in enumerate(alone):
        n = len(CORRUPT[row])
        assert_close(logits[row, :n], alone_logits[0], msg=f"row {row}")
        got = trace[name][row, :, :n, :n] if name.endswith("pattern") else trace[name][row, :n]
        assert_close(got, alone_trace[name][0], msg=f"row {row}")


# Not mean_ablate of a pattern: its mean is per query position over the source's length, which a row alone lacks.
@pytest.mark.parametrize(("kind", "name"), [(k, n) for k in ("patch", "zero", "mean") for n in TAPS
                                            if not (k == "mean" and n.endswith("pattern"))])
def test_each_row_of_a_ragged_batch_gets_what_it_gets_alone(model, kind: str, name: str) -> None:
    for positions in POSITIONS:
        assert_rows_as_alone(model, kind, name, positions)
    refused = [p for p in POSITIONS if kind == "patch" and is_refused_alone(model, name, p)]
    assert len(refused) < len(POSITIONS) // 2, refused  # most are compared, not refused


def is_refused_alone(model: GPT, name: str, positions) -> bool:
    try:
        for clean, tokens in zip(SAME_LENGTHS if name.endswith("pattern") else CLEAN, CORRUPT):
            model.run([tokens], edits=helper("patch", model.run([clean], taps=name)[1], name, positions))
    except EditError:
        return True
    return False


def test_last_and_minus_one_are_the_last_real_token_not_the_padding(model) -> None:
    name = "blocks.1.resid_pre"
    _, plain = model.run(CORRUPT, taps=name)
    for positions in (-1, "last", [-1]):
        _, trace = model.run(CORRUPT, taps=name, edits=edits.zero_ablate(name, positions=positions))
        for row, tokens in enumerate(CORRUPT):
            n = len(tokens)
            assert (trace[name][row, n - 1] == 0).all()
            assert torch.equal(trace[name][row, :n - 1], plain[name][row, :n - 1])
            assert torch.equal(trace[name][row, n:], plain[name][row, n:])  # the padding is left alone


def test_a_position_a_shorter_row_lacks_leaves_that_row_alone(model) -> None:
    name = "blocks.2.mlp.post"
    plain, _ = model.run(CORRUPT)
    edited, trace = model.run(CORRUPT, taps=name, edits=edits.zero_ablate(name, positions=[4, -5]))
    assert torch.equal(edited[0, :3], plain[0, :3]) and torch.equal(edited[2, :4], plain[2, :4])
    assert (trace[name][1, [2, 4]] == 0).all()
    with pytest.raises(EditError, match="position 7 does not exist.*positions 0..6"):
        model.run(CORRUPT, edits=edits.zero_ablate(name, positions=7))


def test_patching_a_ragged_source_into_an_unpadded_run_counts_in_each_source_row(model) -> None:
    name = "blocks.1.resid_post"
    _, clean = model.run(CLEAN, taps=name)
    equal = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1], [2, 2, 2, 2]])
    _, trace = model.run(equal, taps=name, edits=edits.patch(clean, name, positions="last"))
    for row, tokens in enumerate(CLEAN):
        assert torch.equal(trace[name][row, -1], clean[name][row, len(tokens) - 1])
    with pytest.raises(EditError, match="picks 5 positions of the source but 3 of the run in row 0"):
        model.run(CORRUPT, edits=edits.patch(clean, name, positions=[0, 1, 2, 5, -6]))


def test_edit_functions_may_ask_for_the_mask_and_the_step(model) -> None:
    seen = []

    def edit(x: torch.Tensor, name: str, *, mask: torch.Tensor | None, step: int) -> torch.Tensor:
        seen.append((name, mask, step))
        return x

    _, trace = model.run(CORRUPT, edits={"blocks.0.ln1": edit})
    assert seen[0][0] == "blocks.0.ln1" and torch.equal(seen[0][1], trace.mask) and seen[0][2] == 0
    seen.clear()
    model.run(torch.tensor([[1, 2, 3]]), edits=edits.combine({"blocks.0.ln1": edit}, {"blocks.0.ln1": edit}))
    assert seen == [("blocks.0.ln1", None, 0)] * 2  # every link of a chain gets them


def test_mean_ablation_of_the_batch_being_run_leaves_its_padding_out(model) -> None:
    name = "blocks.0.mlp.post"
    _, plain = model.run(CORRUPT, taps=name)
    real = torch.cat([plain[name][row, :len(tokens)] for row, tokens in enumerate(CORRUPT)])  # [14, M]
    _, trace = model.run(CORRUPT, taps=name, edits=edits.mean_ablate(name, positions="last"))
    for row, tokens in enumerate(CORRUPT):
        assert_close(trace[name][row, len(tokens) - 1], real.mean(0))
    with pytest.raises(EditError, match="'last' \\(each row's last real token\\)"):
        edits.zero_ablate(name, positions="first")


def test_left_padding_from_an_attention_mask_counts_the_same_way(model) -> None:
    name = "blocks.1.resid_mid"
    tokens = torch.tensor([[0, 0, 3, 3, 9], [1, 4, 6, 7, 2]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    chosen = edits.zero_ablate(name, positions=[-2, 0])
    logits, _ = model.run(tokens, attention_mask=mask, edits=chosen)
    assert_close(logits[0, 2:], model.run([[3, 3, 9]], edits=chosen)[0][0])
    assert_close(logits[1], model.run([[1, 4, 6, 7, 2]], edits=chosen)[0][0])
