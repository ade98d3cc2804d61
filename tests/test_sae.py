"""Sparse autoencoders on harvested rows (probes.sae): the SAE's maths, training (resumed bit for bit, two
torchrun processes following one), the measures, the splice into run/generate, its files (SAELens loads
them) and the README's worked example."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.errors import CheckpointError, EditError, InputError, TrainingError
from minigpt.harvest import harvest, read
from probes.sae import SAE, SAESettings, geometric_median, loss_recovered, measure, splice, top_activations, train
from probes.sae.loop import _remove_parallel_gradient, aux_loss

ROOT = Path(__file__).resolve().parent.parent
CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, n_positions=32)
TAP = "blocks.0.resid_post"
WORDS = "the river tower blue walks over under Paris city , . ( ) 1999 ok def return".split()
QUICK = SAESettings(d_sae=48, activation="relu", l1_coefficient=1e-3, steps=14, batch_size=64, lr=3e-3,
                    dead_after=150, aux_k=4, warmup=3, init_rows=256)


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT.random(CFG, seed=0)


@pytest.fixture(scope="module")
def harvested(model, tmp_path_factory) -> Path:
    """A float32 harvest of TAP over 40 short documents (about 540 rows, 9 batches of 64)."""
    directory = tmp_path_factory.mktemp("sae")
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (14,), generator=g).tolist()) for _ in range(40)]
    (directory / "c.txt").write_text("\n".join(docs))
    harvest(model, directory / "c.txt", [TAP, "blocks.1.attn.z"], directory / "h", context=32, lines=True,
            quiet=True, store_dtype=torch.float32)
    return directory / "h"


def weights(sae: SAE) -> dict[str, torch.Tensor]:
    return {name: getattr(sae, name).detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


def perfect_sae(d_in: int, centre: torch.Tensor, dtype=torch.float64) -> SAE:
    """relu(x - c) and relu(c - x) as 2 d_in latents, decoded as their difference plus c: x exactly."""
    sae = SAE(d_in, 2 * d_in, dtype=dtype)
    eye = torch.eye(d_in, dtype=dtype)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_dec.copy_(centre)
    return sae


# ---------------------------------------------------------------------------------------------
# The SAE itself


def test_encode_decode_relu_and_topk() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 8, generator=g)
    for activation, k in (("relu", None), ("topk", 3)):
        sae = SAE(8, 20, activation, k).initialise(torch.randn(50, 8, generator=g), seed=3)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        z = sae.encode(x)
        if activation == "relu":
            assert torch.equal(z, torch.relu(pre))
        else:
            assert ((z > 0).sum(-1) <= 3).all() and (z >= 0).all()
            top = pre.topk(3, dim=-1).indices
            assert torch.equal(z.gather(-1, top), torch.relu(pre.gather(-1, top)))
            assert z.sum() == z.gather(-1, top).sum()
        torch.testing.assert_close(sae(x), z @ sae.W_dec + sae.b_dec)
        # any leading shape, a single vector too: row by row the same latents
        torch.testing.assert_close(sae.encode(x[0]), z[0])
        torch.testing.assert_close(sae.encode(torch.stack([x, x])), torch.stack([z, z]))


def test_initialisation_ties_encoder_to_decoder_and_centres_b_dec() -> None:
    g = torch.Generator().manual_seed(2)
    sample = torch.cat([torch.randn(99, 6, generator=g) * 0.1, torch.full((1, 6), 1000.0)])  # one far outlier
    sae = SAE(6, 16).initialise(sample, seed=0)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))
    assert torch.equal(sae.b_enc, torch.zeros(16))
    assert sae.b_dec.norm() < 0.1 < sample.mean(0).norm()  # the median ignores the outlier; the mean does not
    mean = SAE(6, 16).initialise(sample, b_dec_init="mean")
    torch.testing.assert_close(mean.b_dec, sample.mean(0))
    assert torch.equal(SAE(6, 16).initialise(sample, seed=0).W_dec, sae.W_dec)  # seeded
    assert not torch.equal(SAE(6, 16).initialise(sample, seed=1).W_dec, sae.W_dec)


def test_geometric_median_has_zero_subgradient() -> None:
    points = torch.randn(200, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) ** 3
    median = geometric_median(points)
    directions = (points - median) / (points - median).norm(dim=1, keepdim=True)
    assert directions.sum(0).norm() < 1e-3 * len(points)


def test_parallel_gradient_removed_and_aux_loss_trains_dead_latents_only() -> None:
    W = torch.nn.functional.normalize(torch.randn(10, 4), dim=1).requires_grad_()
    W.grad = torch.randn(10, 4)
    _remove_parallel_gradient(W)
    assert (W.grad * W).sum(1).abs().max() < 1e-6
    sae = SAE(4, 10).initialise(torch.randn(30, 4), seed=0)
    x = torch.randn(7, 4)
    pre = sae.pre_activations(x)
    residual = (x - sae(x)).detach()
    assert torch.equal(aux_loss(sae, pre, residual, torch.zeros(10, dtype=torch.bool), 3), torch.zeros(7))
    dead = torch.zeros(10, dtype=torch.bool)
    dead[[2, 5]] = True
    aux_loss(sae, pre, residual, dead, 3).sum().backward()
    moved = sae.W_enc.grad.abs().sum(0) > 0
    assert moved[[2, 5]].any() and not moved[~dead].any()


def test_settings_and_sae_refuse_what_cannot_work() -> None:
    for bad, text in [(dict(activation="gelu"), "activation"), (dict(activation="topk"), "k"),
                      (dict(k=4), "'topk' only"), (dict(d_sae=0), "d_sae"), (dict(lr=float("nan")), "lr"),
                      (dict(batch_size=True), "batch_size"), (dict(b_dec_init="zero"), "b_dec_init")]:
        with pytest.raises(TrainingError, match=text):
            SAESettings(**bad)
    with pytest.raises(InputError, match="k"):
        SAE(4, 8, "topk", k=9)
    with pytest.raises(InputError, match="row_shape"):
        SAE(4, 8, row_shape=(3, 2))
    sae = SAE(4, 8)
    with pytest.raises(EditError, match="encode and decode"):
        splice(torch.zeros(3), "blocks.0.resid_post")
    with pytest.raises(InputError, match="a latent must be an integer in \\[0, 7\\], got 8"):
        top_activations(sae, torch.zeros(5, 4), [1, 8])
    with pytest.raises(InputError, match="no rows"):
        measure(sae, torch.zeros(0, 4))
    with pytest.raises(InputError, match="two tokens or more"):
        loss_recovered(GPT.random(CFG, seed=0), sae, TAP, "the")


# ---------------------------------------------------------------------------------------------
# Training


def test_training_reconstructs_keeps_unit_decoder_rows_and_logs_metrics(harvested, tmp_path, capsys) -> None:
    rows = read(harvested, TAP)
    sae = train(rows, tmp_path / "sae", SAESettings(d_sae=32, activation="topk", k=4, steps=30, batch_size=64,
                                                    lr=3e-3, dead_after=100))
    assert "sae" in capsys.readouterr().err  # the progress bar
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    log = [json.loads(line) for line in (tmp_path / "sae" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 31))
    assert set(log[0]) == {"step", "loss", "mse", "l1", "aux", "l0", "explained_variance", "dead_fraction", "lr"}
    assert all(e["l0"] <= 4 for e in log) and log[-1]["l0"] > 3 and log[-1]["mse"] < log[0]["mse"]
    assert log[-1]["explained_variance"] > 0.3
    stats = measure(sae, rows)
    assert stats.l0 <= 4 and stats.tokens == len(rows) and stats.explained_variance > 0.3
    loaded = SAE.load(tmp_path / "sae")
    assert all(torch.equal(a, b) for a, b in zip(weights(loaded).values(), weights(sae).values()))
    assert loaded.hook_name == TAP and loaded.k == 4 and loaded.model_name


def test_a_run_stopped_and_resumed_equals_the_uninterrupted_run(harvested, tmp_path) -> None:
    """14 steps cross an epoch (9 batches); the stopped run's log also holds two steps past its checkpoint,
    as a run killed there would, which the resumed run must cut back."""
    rows = read(harvested, TAP)
    whole = train(rows, tmp_path / "whole", QUICK, save_every=5, quiet=True)
    stopped = train(rows, tmp_path / "parts", QUICK, save_every=5, stop_after=5, quiet=True)
    assert stopped is not None and (tmp_path / "parts" / "training" / "step-5.safetensors").is_file()
    with (tmp_path / "parts" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 6, "loss": 0}) + "\n" + json.dumps({"step": 7, "loss": 0}) + "\n")
    resumed = train(rows, tmp_path / "parts", QUICK, save_every=5, quiet=True)
    for name, value in weights(whole).items():
        assert torch.equal(value, getattr(resumed, name)), name
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "parts" / "metrics.jsonl").read_text()
    log = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert max(e["dead_fraction"] for e in log) > 0 and max(e["aux"] for e in log) > 0  # the aux loss was at work
    assert sorted(p.name for p in (tmp_path / "parts" / "training").iterdir()) == ["state.json", "step-14.safetensors"]
    with pytest.raises(TrainingError, match="other settings"):
        train(rows, tmp_path / "parts", SAESettings(**{**QUICK.__dict__, "lr": 1e-3}), quiet=True)


SCRIPT = """
import json, sys
import torch
from minigpt.harvest import read
from probes.sae import SAESettings, train
torch.set_num_threads(1)
train(read(sys.argv[1], sys.argv[2]), sys.argv[3], SAESettings(**json.loads(sys.argv[4])), quiet=True)
"""


@pytest.mark.slow
def test_torchrun_two_cpu_processes_follow_one(harvested, tmp_path) -> None:
    rows = read(harvested, TAP)
    one = train(rows, tmp_path / "one", QUICK, quiet=True)
    (tmp_path / "script.py").write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(tmp_path / "script.py"), str(harvested), TAP, str(tmp_path / "two"),
                          json.dumps(QUICK.__dict__)], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    other = SAE.load(tmp_path / "two")
    for name, value in weights(one).items():
        torch.testing.assert_close(getattr(other, name), value, rtol=1e-4, atol=1e-5, msg=name)
    a, b = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("one", "two"))
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for x, y in zip(a, b):
        assert x["mse"] == pytest.approx(y["mse"], rel=1e-4) and x["l0"] == pytest.approx(y["l0"], abs=0.05)
    assert json.loads((tmp_path / "two" / "training" / "state.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------------------------------------
# Measures and the splice


def test_a_perfect_sae_explains_everything_and_recovers_all_the_loss(harvested) -> None:
    model = GPT.random(CFG, seed=0, dtype=torch.float64)
    rows = read(harvested, TAP)
    sae = perfect_sae(16, rows[:].double().median(0).values)
    stats = measure(sae, rows, batch_size=100)
    assert stats.explained_variance == pytest.approx(1, abs=1e-12) and stats.mse < 1e-20
    assert len(stats.dead) == 0 and stats.frequency.max() <= 1
    assert stats.l0 == pytest.approx((stats.frequency.sum()).item())
    recovered = loss_recovered(model, sae, TAP, ["the river walks over the tower", "blue city ( 1999 )"])
    assert recovered.recovered == pytest.approx(1, abs=1e-9) and recovered.spliced == pytest.approx(recovered.clean)
    assert recovered.zero_ablation > recovered.clean
    with torch.no_grad():
        sae.b_enc[3] = -1e9  # never fires
    stats = measure(sae, rows, dense_threshold=0.2)
    assert 3 in stats.dead.tolist() and 3 not in stats.dense.tolist()
    assert set(stats.dense.tolist()) == set((stats.frequency > 0.2).nonzero().flatten().tolist())
    assert stats.dead_fraction == len(stats.dead) / 32


def test_splice_with_the_error_term_changes_nothing_and_without_it_changes_the_logits(harvested) -> None:
    model = GPT.random(CFG, seed=0, dtype=torch.float64)
    sae = SAE(16, 40, "topk", k=3, dtype=torch.float64).initialise(read(harvested, TAP)[:200], seed=0)
    text = "the river walks over the tower in Paris"
    clean, before = model.run(text, TAP)
    exact, trace = model.run(text, TAP, edits=splice(sae, TAP, error_term=True))
    torch.testing.assert_close(exact, clean, rtol=0, atol=1e-12)
    spliced, trace = model.run(text, TAP, edits=splice(sae, TAP))
    assert (spliced - clean).abs().max() > 1e-3
    torch.testing.assert_close(trace[TAP], sae(before[TAP]))  # what ran on (and was recorded) is the reconstruction
    grown = model.generate(text, 4, seed=0, edits=splice(sae, TAP, error_term=True))
    assert torch.equal(grown, model.generate(text, 4, seed=0))
    # A head-shaped tap [B, S, H, d]: the heads' values flattened into d_in = H * d and back.
    heads = SAE(16, 24, dtype=torch.float64, row_shape=(2, 8)).initialise(read(harvested, "blocks.1.attn.z")[:100])
    same, _ = model.run(text, edits=splice(heads, "blocks.1.attn.z", error_term=True))
    torch.testing.assert_close(same, clean, rtol=0, atol=1e-12)
    with pytest.raises(EditError, match="rows of 16 values, but tap 'blocks.1.mlp.post' has 64"):
        model.run(text, edits=splice(heads, "blocks.1.mlp.post"))


def test_top_activations_are_the_largest(harvested) -> None:
    rows = read(harvested, TAP)
    sae = SAE(16, 20).initialise(rows[:100], seed=1)
    top = top_activations(sae, rows, [0, 7], n=4, batch_size=50)
    z = sae.encode(rows[:]).double()
    for latent, found in top.items():
        best = z[:, latent].topk(4)
        assert [v for v, _ in found] == pytest.approx(best.values[best.values > 0].tolist())
        assert [z[row, latent].item() for _, row in found] == pytest.approx([v for v, _ in found])


# ---------------------------------------------------------------------------------------------
# Files


def test_cfg_json_has_saelens_fields_and_damage_is_refused(harvested, tmp_path) -> None:
    sae = SAE(16, 32, "topk", k=4, hook_name=TAP, model_name="m").initialise(read(harvested, TAP)[:100])
    sae.save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert {k: cfg[k] for k in ("d_in", "d_sae", "dtype", "hook_name", "activation_fn", "activation_fn_kwargs",
                                "apply_b_dec_to_input", "normalize_activations", "architecture", "model_name")} == {
        "d_in": 16, "d_sae": 32, "dtype": "float32", "hook_name": TAP, "activation_fn": "topk",
        "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": True, "normalize_activations": "none",
        "architecture": "topk", "model_name": "m"}
    with pytest.raises(CheckpointError, match="does not exist"):
        SAE.load(tmp_path / "nothing")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 33}))
    with pytest.raises(CheckpointError, match="do not belong together"):
        SAE.load(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_in": -1}))
    with pytest.raises(CheckpointError, match="d_in"):
        SAE.load(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "d_sae"}))
    with pytest.raises(CheckpointError, match="not an SAE config"):
        SAE.load(tmp_path / "s")


@pytest.mark.slow
def test_saelens_loads_the_saved_sae(harvested, tmp_path) -> None:
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is not installed (pip install sae-lens)")
    x = read(harvested, TAP)[:50]
    for activation, k in (("relu", None), ("topk", 5)):
        ours = SAE(16, 32, activation, k, hook_name=TAP, model_name="m").initialise(x, seed=2)
        with torch.no_grad():
            ours.b_enc.normal_(0, 0.3)
        ours.save(tmp_path / activation)
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / activation))
        assert theirs.cfg.architecture() == ("topk" if k else "standard") and theirs.cfg.metadata.hook_name == TAP
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), ours.encode(x))
            torch.testing.assert_close(theirs.decode(ours.encode(x)), ours(x))


# ---------------------------------------------------------------------------------------------
# The README's worked example (a smaller variant: fewer tokens and steps)


@pytest.mark.slow
def test_readme_worked_example_runs(tmp_path, monkeypatch, capsys) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n### Sparse autoencoders on harvested rows\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    for long, short in (("max_tokens=20_000", "max_tokens=3_000"), ("steps=600", "steps=40")):
        assert long in block
        block = block.replace(long, short)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md (Sparse autoencoders)", "exec"), namespace)
    out = capsys.readouterr().out
    assert "L0 8.0, explained variance" in out and "recovered=" in out
    assert len(namespace["common"]) == 4 and (tmp_path / "sae-example" / "sae" / "cfg.json").is_file()
