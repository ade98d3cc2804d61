"""Path patching (probes.path_patching) equals the same experiment written by hand with hooks on HF's GPT-2.

The hand-written version is the bench's contender (scripts/bench/path_patching.py: pre-hooks on
c_proj freezing head outputs, forward hooks on c_attn keeping and putting back q, k, v), run on a
GPT2LMHeadModel with eager attention and random float64 weights (every bias and LayerNorm weight
too, tests/hf_reference.py), compared to float64 rounding. Then what must hold whatever the weights,
the errors, and the bench concern's quick run.
"""
from __future__ import annotations

import math

import pytest
import torch
from hf_reference import Case, assert_close, cases, make_hf, to_minigpt
from hypothesis import given
from hypothesis import strategies as st

from minigpt import GPT, GPTConfig, InputError
from probes.path_patching import logit_difference, path_patch, path_patch_sweep
from scripts.bench import cli
from scripts.bench import path_patching as bench

QKV = ["q", "k", "v"]


def corrupted(case: Case) -> torch.Tensor:
    """Other random tokens of the shape of ``case.tokens()``."""
    generator = torch.Generator().manual_seed(case.seed + 2)
    return torch.randint(case.config["vocab_size"], (case.batch, case.seq), generator=generator)


@st.composite
def experiment(draw, n_layer: int, n_head: int, seq: int, vocab: int):
    """Receivers (1 to 3 heads, any layers), which of their q/k/v, the frozen run and a logit-difference metric."""
    heads = st.tuples(st.integers(0, n_layer - 1), st.integers(0, n_head - 1))
    receivers = draw(st.lists(heads, min_size=1, max_size=3, unique=True), label="receivers")
    inputs = draw(st.lists(st.sampled_from(QKV), min_size=1, max_size=3, unique=True), label="receiver_inputs")
    frozen = draw(st.sampled_from(["clean", "corrupt"]), label="frozen")
    answer, wrong, position = (draw(st.integers(0, vocab - 1)), draw(st.integers(0, vocab - 1)),
                               draw(st.integers(-seq, seq - 1)))
    return receivers, inputs, frozen, logit_difference(answer, wrong, position)


@given(case=cases(max_layer=3, max_head=3, max_positions=12), data=st.data())
def test_the_sweep_equals_hf_with_hooks_sender_by_sender(case: Case, data) -> None:
    hf = make_hf(case.config, case.seed, torch.float64)
    model = to_minigpt(hf)
    cfg = model.cfg
    clean, corrupt = case.tokens(), corrupted(case)
    receivers, inputs, frozen, metric = data.draw(experiment(cfg.n_layer, cfg.n_head, case.seq, cfg.vocab_size))
    per_run = data.draw(st.integers(1, 5), label="senders_per_run")
    ours = path_patch_sweep(model, clean, corrupt, receivers, metric, receiver_inputs=inputs, frozen=frozen,
                            senders_per_run=per_run)
    base, source = (clean, corrupt) if frozen == "clean" else (corrupt, clean)
    theirs = bench.hf_path_patch_sweep(hf, base, source, receivers, inputs, metric)
    assert ours.shape == (cfg.n_layer, cfg.n_head) and ours.dtype == torch.float64
    assert_close(ours, theirs)


@given(case=cases(max_layer=3, max_head=3, max_positions=12), data=st.data())
def test_a_set_of_senders_equals_hf_with_hooks(case: Case, data) -> None:
    hf = make_hf(case.config, case.seed, torch.float64)
    model = to_minigpt(hf)
    cfg = model.cfg
    clean, corrupt = case.tokens(), corrupted(case)
    receivers, inputs, frozen, metric = data.draw(experiment(cfg.n_layer, cfg.n_head, case.seq, cfg.vocab_size))
    heads = st.tuples(st.integers(0, cfg.n_layer - 1), st.integers(0, cfg.n_head - 1))
    senders = data.draw(st.lists(heads, min_size=1, max_size=4, unique=True), label="senders")
    ours = path_patch(model, clean, corrupt, senders, receivers, metric, receiver_inputs=inputs, frozen=frozen)
    base, source = (clean, corrupt) if frozen == "clean" else (corrupt, clean)
    theirs = bench.hf_path_patch(hf, base, bench.hf_head_outputs(hf, base), bench.hf_head_outputs(hf, source),
                                 senders, receivers, inputs, metric)
    assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64))


def tiny(seed: int = 0) -> GPT:
    """Random weights large enough that heads differ: the HF-style draw of tests/hf_reference.py."""
    config = dict(vocab_size=50, n_positions=16, n_embd=24, n_layer=3, n_head=3, activation_function="gelu_new")
    return to_minigpt(make_hf(config, seed, torch.float64))


def test_senders_that_cannot_reach_the_receivers_change_nothing() -> None:
    """A sender at or after the receivers' block writes after their q/k/v are made: the metric stays the base run's."""
    model = tiny()
    generator = torch.Generator().manual_seed(0)
    clean, corrupt = (torch.randint(50, (2, 7), generator=generator) for _ in range(2))
    metric = logit_difference(3, 4)
    grid = path_patch_sweep(model, clean, corrupt, [(1, 0), (1, 2)], metric, receiver_inputs=QKV)
    base = float(metric(model.run(clean)[0]))
    assert_close(grid[1:], torch.full_like(grid[1:], base))
    assert ((grid[0] - base).abs() > 1e-6).all()  # block 0's heads do reach them
    swapped = path_patch_sweep(model, clean, corrupt, [(1, 0)], metric, frozen="corrupt")
    assert_close(swapped[1:], torch.full_like(swapped[1:], float(metric(model.run(corrupt)[0]))))


def test_all_of_block_0_as_senders_into_v_of_block_1_is_two_patched_runs() -> None:
    """Every head of block 0 sending into head 1 of block 1 through v: block 0's attn.z patched whole from the
    corrupt run, block 1's v recorded, then head 1's v put back into a clean run (minigpt's edits, by hand)."""
    model = tiny(1)
    generator = torch.Generator().manual_seed(1)
    clean, corrupt = (torch.randint(50, (1, 6), generator=generator) for _ in range(2))
    metric = logit_difference(5, 6, position=2)
    everyone = [(0, h) for h in range(model.cfg.n_head)]
    ours = path_patch(model, clean, corrupt, everyone, (1, 1), metric, receiver_inputs="v")
    # By hand with minigpt's edits: block 0's heads all from the corrupt run, v of head 1 recorded, put back.
    from minigpt import edits
    _, corrupt_z = model.run(corrupt, taps="blocks.0.attn.z")
    _, sent = model.run(clean, taps="blocks.1.attn.v", edits=edits.patch(corrupt_z, "blocks.0.attn.z"))
    logits, _ = model.run(clean, edits=edits.patch(sent, "blocks.1.attn.v", heads=1))
    assert_close(torch.tensor(ours, dtype=torch.float64), metric(logits))


@pytest.mark.parametrize("call, message", [
    (lambda m, c: path_patch_sweep(m, c, c[:, :-1], [(1, 0)], logit_difference(1, 2)), "shape"),
    (lambda m, c: path_patch_sweep(m, [[1, 2, 3], [4, 5]], c, [(1, 0)], logit_difference(1, 2)), "lengths"),
    (lambda m, c: path_patch_sweep(m, c, c, [(3, 0)], logit_difference(1, 2)), "layer"),
    (lambda m, c: path_patch_sweep(m, c, c, [(0, -1)], logit_difference(1, 2)), "head"),
    (lambda m, c: path_patch_sweep(m, c, c, [], logit_difference(1, 2)), "non-empty"),
    (lambda m, c: path_patch_sweep(m, c, c, [(1, 0)], logit_difference(1, 2), receiver_inputs="x"), "'q'"),
    (lambda m, c: path_patch_sweep(m, c, c, [(1, 0)], logit_difference(1, 2), receiver_inputs=[]), "none"),
    (lambda m, c: path_patch_sweep(m, c, c, [(1, 0)], logit_difference(1, 2), frozen="both"), "clean"),
    (lambda m, c: path_patch_sweep(m, c, c, [(1, 0)], logit_difference(1, 2), senders_per_run=0), "senders_per_run"),
    (lambda m, c: path_patch_sweep(m, c, c, [(1, 0)], lambda logits: logits[:, -1, 0]), "one number"),
    (lambda m, c: path_patch(m, c, c, "0.1", [(1, 0)], logit_difference(1, 2)), "senders"),
])
def test_what_does_not_fit_is_refused_naming_it(call, message: str) -> None:
    model = GPT.random(GPTConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=3, n_head=2), seed=0)
    clean = torch.randint(50, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match=message):
        call(model, clean)


def test_the_bench_concern_runs_on_tiny_shapes(tmp_path) -> None:
    """--quick: every contender timed, the three sweeps agree, the target has a finite value (timings not judged)."""
    args = cli.parse_args(["--quick", "--threads", "1", "--out", str(tmp_path), "--no-forward", "--no-load",
                           "--patching"])
    section = bench.measure(args, log=lambda _: None)
    assert [r["contender"] for r in section["rows"]] == [
        "minigpt path_patch_sweep", "HF GPT2LMHeadModel (sdpa) + hooks", "HF GPT2LMHeadModel (eager) + hooks"]
    assert all(r["median_s"] > 0 and r["calls"] >= 2 and r["max_abs_diff_vs_minigpt"] < 1e-4 for r in section["rows"])
    assert math.isfinite(section["target_values"]["patching.sweep_vs_hf"])
    assert "path_patch_sweep" in bench.markdown(section)


def test_the_readme_example_runs_and_says_what_it_finds() -> None:
    """README's "Circuits in experiments" block on pydoc-tiny, and the numbers the text gives."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    heading = "\n## Circuits in experiments: induction heads and path patching\n"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    namespace: dict = {}
    exec(compile(block, "README.md (Circuits in experiments)", "exec"), namespace)
    found, grid, metric, model = namespace["found"], namespace["grid"], namespace["metric"], namespace["model"]
    assert found.scores.shape == (8, 4) and 0.008 <= found.scores.min() and found.scores.max() <= 0.015
    assert round(found.chance, 4) == 0.0136
    assert round(found.induction_loss, 1) == 13.2 and round(found.loss_first.mean().item(), 1) == 13.0
    clean, corrupt = (float(metric(model.run(namespace[name])[0])) for name in ("clean", "corrupt"))
    assert (round(clean, 3), round(corrupt, 3)) == (0.783, 0.781)
    assert grid.shape == (8, 4) and (grid - clean).abs().max() < 1e-3
    # The receivers' own block sends nothing into their queries.
    assert_close(grid[7], torch.full((4,), clean, dtype=torch.float64), torch.float32)
    assert isinstance(namespace["one"], float)
