"""The bench (``python -m scripts.bench``) end to end in its quick mode (tiny model, 2 x 16 tokens):
every contender is there with sane fields, the byte accounting is exact, the memory-saving
options of Taps really save, and the load row has its four contenders with finite ratios.
Never asserts on timings."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt import GPT, GPTConfig, tap_names
from minigpt.memory import nbytes_estimate

from scripts.bench import cli, contenders, forward, targets

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([sys.executable, "-m", "scripts.bench", "--quick", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "bench.json").read_text(encoding="utf-8")), out


def test_every_contender_is_measured_with_sane_fields(quick) -> None:
    full, out = quick
    report = full["forward"]
    skip_tl = report["tl_skipped"] is not None
    expected = [c.name for c in contenders.forward_contenders("cpu", compile=False, skip_tl=skip_tl)]
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == expected
    assert {"minigpt_plain", "minigpt_resid4", "minigpt_all", "hf_eager_plain", "hf_sdpa_plain",
            "hf_eager_hidden_hooks", "hf_sdpa_hidden_hooks"} <= set(results)
    for r in results.values():
        # 2 rounds, plus at most 1 more when other processes disturbed too many calls.
        assert report["repeats"] == 2 and len(r["times_s"]) in (2, 3) and all(t > 0 for t in r["times_s"])
        assert 1 <= r["quiet_calls"] <= r["calls"] == len(r["times_s"]) == len(r["cpu_shares"])
        assert min(r["times_s"]) <= r["median_s"] <= max(r["times_s"])
        assert r["median_s"] > 0 and r["tokens_per_s"] > 0 and r["fraction_of_ceiling"] > 0
        assert r["ratio_to_minigpt_plain"] > 0 and r["ratio_to_hf_sdpa_plain"] > 0
        assert r["max_abs_logit_diff_vs_minigpt"] < 1e-4, r["name"]  # every library ran the same weights
        assert isinstance(r["peak_extra_bytes"], int) and r["logits_bytes"] == 2 * 16 * 1000 * 4
        assert (r["recorded_bytes"] > 0) == (r["kind"] == "record"), r["name"]
    assert report["matmul_ceiling_flops_per_s"] > 0 and report["forward_flops"] > 0
    assert full["versions"]["torch"] and full["hardware"]
    assert {t["target"] for t in full["targets"]} >= {"every tap: time over minigpt plain"}
    table = (out / "bench.md").read_text()
    assert all(r["label"] in table for r in results.values())


def test_recorded_bytes_are_exact_and_the_keep_options_save(quick) -> None:
    report = quick[0]["forward"]
    r = {x["name"]: x for x in report["results"]}
    cfg = report["config"]
    L, B, S, D = cfg["n_layer"], report["batch"], report["seq"], cfg["n_embd"]
    residual = B * S * D * 4
    # resid_pre of block 0, then attn_delta, mlp_delta and resid_post of each block; resid_pre of
    # block L+1 is resid_post of block L, the same tensor, counted once.
    assert r["minigpt_resid4"]["recorded_bytes"] == (1 + 3 * L) * residual
    # HF: 13 hidden states (the last after ln_f: a tensor of its own) and the two c_proj outputs per block.
    assert r["hf_sdpa_hidden_hooks"]["recorded_bytes"] == (L + 1 + 2 * L) * residual
    # positions= keeps one position of S, as a compact copy (no view pinning the whole tensor).
    assert r["minigpt_resid4_last"]["recorded_bytes"] == 4 * L * residual // S
    # dtype=bfloat16: every tap a bf16 copy of its own, 2 bytes a value (the memory guard's arithmetic).
    config = GPTConfig.from_hf(cfg)
    assert r["minigpt_all_bf16"]["recorded_bytes"] == sum(nbytes_estimate(tap_names(L), B, S, config, 2).values())
    assert r["minigpt_all_bf16"]["recorded_bytes"] < 0.6 * r["minigpt_all"]["recorded_bytes"]
    assert r["minigpt_all_but_heads"]["recorded_bytes"] < r["minigpt_all"]["recorded_bytes"]
    if "tl_cache_resid4" in r:
        assert r["tl_cache_resid4"]["recorded_tensors"] == 4 * L


def test_memory_subprocess_reports_one_contender(quick) -> None:
    full, out = quick
    report = full["forward"]
    args = cli.parse_args(["--quick", "--threads", "1", "--out", str(out)])
    measured = forward.memory_subprocess("minigpt_resid4", args, out / "checkpoint-quick")
    assert "memory_error" not in measured, measured
    assert measured["peak_extra_bytes"] >= 0 and measured["recorded_tensors"] == 4 * report["config"]["n_layer"]


def test_forward_flops_count_of_gpt2_small() -> None:
    # 12 x (24 B S D^2 + 4 B S^2 D) + 2 B S D V at batch 1 x 1024: the usual ~2 x 124M FLOPs a token and attention.
    cfg = GPTConfig()
    assert forward.forward_flops(cfg, 1, 1024) == 12 * (24 * 1024 * 768**2 + 4 * 1024**2 * 768) + 2 * 1024 * 768 * 50257


def test_load_row_has_every_contender_with_finite_ratios(quick) -> None:
    full, out = quick
    load = full["load"]
    rows = {r["name"]: r for r in load["rows"]}
    assert list(rows) == ["minigpt_float32", "hf_float32", "minigpt_bfloat16", "hf_bfloat16"]
    assert "model.safetensors" in load["files"] and not any(f.endswith(".bin") for f in load["files"])
    values = sum(math.prod(shape) for shape in GPT.parameter_shapes(GPTConfig.from_hf(load["config"])).values())
    for r in rows.values():
        # The parameters' bytes in the loaded dtype: both libraries hold the same weights (the head tied).
        assert r["weight_bytes"] == values * (4 if r["dtype"] == "float32" else 2), r["name"]
        assert len(r["load_times_s"]) == len(r["load_and_forward_times_s"]) == len(r["peaks_bytes"]) == load["rounds"]
        assert 0 < r["load_s"] <= r["load_and_forward_s"]
        assert 1 <= r["quiet_rounds"] <= load["rounds"] and len(r["cpu_shares"]) == load["rounds"]
        for key in ("peak_over_weights", "time_vs_hf", "load_only_vs_hf", "quiet_time_vs_hf"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
        assert r["peak_extra_bytes"] > 0 and r["memory_method"]
        # Both libraries ran the same weights: fp32 to rounding, bf16 to its precision.
        assert r["max_abs_logit_diff_vs_hf"] < (1e-4 if r["dtype"] == "float32" else 0.1), r["name"]
    assert rows["hf_float32"]["time_vs_hf"] == rows["hf_bfloat16"]["time_vs_hf"] == 1.0
    checked = {t["key"]: t for t in full["targets"]}
    load_targets = [t.key for t in targets.TARGETS if t.key.startswith("load.")]
    assert set(load_targets) <= set(checked)
    assert checked["load.float32.time_vs_hf"]["value"] == rows["minigpt_float32"]["time_vs_hf"]
    table = (out / "bench.md").read_text(encoding="utf-8")
    assert all(r["label"] in table for r in rows.values())


def test_train_row_steps_both_libraries_alike(tmp_path) -> None:
    """The train concern's steps: minigpt's and HF's give the same losses step after step (dropout off), and its
    section has every contender with a finite ratio."""
    import dataclasses

    from scripts.bench import cli, train
    from scripts.bench.contenders import QUICK_CONFIG, hf_twin

    model = GPT.random(dataclasses.replace(QUICK_CONFIG, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0), seed=0)
    hf = train._HFAsGPT(hf_twin(model))
    rows = torch.randint(0, QUICK_CONFIG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    ours, theirs = (train.stepper(m, m, rows[:, :-1], rows[:, 1:]) for m in (model, hf))
    for _ in range(3):
        a, b = ours(), theirs()
        assert abs(a - b) < 1e-5 * abs(b)
    args = cli.parse_args(["--quick", "--threads", "1", "--out", str(tmp_path), "--no-forward", "--no-load", "--train"])
    section = train.measure(args, log=lambda _: None)
    assert [r["contender"] for r in section["rows"]] == ["minigpt", "HF GPT2LMHeadModel (sdpa)",
                                                         "HF GPT2LMHeadModel (eager)"]
    assert all(r["median_s"] > 0 and math.isfinite(r["x_best_hf_time"]) for r in section["rows"])
    assert math.isfinite(section["target_values"]["train.step_vs_hf"])


def test_the_hf_harvester_writes_minigpts_shards_and_the_harvest_row_is_complete(tmp_path) -> None:
    """The HF + hooks contender writes the same rows, index and shard boundaries as ``minigpt.harvest``
    (bf16 of the same float32 values, so equal up to a rounding step), with a batch that does not
    divide a shard; the harvest section has every contender and its peak stays under its stated bound."""
    from safetensors.torch import load_file

    from minigpt.harvest import harvest
    from scripts.bench import harvest as bench_harvest
    from scripts.bench.contenders import FOUR, hf_twin

    model = GPT.random(bench_harvest.QUICK, seed=0)
    corpus = bench_harvest.write_corpus(tmp_path / "corpus.jsonl", model, 3, 4 * 16)
    windows = bench_harvest.windows_of(corpus, model, 16)  # 12 windows of 16
    row_bytes = 4 * model.cfg.n_layer * model.cfg.n_embd * 2 + 20
    harvest(model, corpus, FOUR, tmp_path / "ours", context=16, batch_size=3, shard_bytes=5 * 16 * row_bytes,
            quiet=True)
    bench_harvest.hf_hooks_harvester(hf_twin(model).transformer, windows, tmp_path / "theirs", 3, 5, 4 * 16)
    ours = sorted((tmp_path / "ours" / "shards").glob("*.safetensors"))
    theirs = sorted((tmp_path / "theirs").glob("*.safetensors"))
    assert len(ours) == len(theirs) == 3  # 5 + 5 + 2 windows
    for a, b in zip(ours, theirs):
        a, b = load_file(a), load_file(b)
        assert a.keys() == b.keys() and len(a) == 4 * model.cfg.n_layer + 3
        for name in a:
            if name.startswith("index."):
                assert torch.equal(a[name], b[name]), name
            else:
                torch.testing.assert_close(a[name].float(), b[name].float(), rtol=1e-2, atol=1e-2)

    args = cli.parse_args(["--quick", "--threads", "1", "--out", str(tmp_path / "bench"), "--no-forward",
                           "--no-load", "--harvest"])
    section = bench_harvest.measure(args, log=lambda _: None)
    assert [r["contender"] for r in section["rows"]][2:4] == ["minigpt harvest, 4 residual taps, bf16, to disk",
                                                              "HF GPT2Model forward, no hooks"]
    assert all(r["median_s"] > 0 and r["calls"] >= 2 for r in section["rows"])
    assert all(math.isfinite(v) and v > 0 for v in section["target_values"].values())
    assert section["written_bytes_per_call"] > section["tokens"] * row_bytes
    assert 0 < section["peak"]["peak_extra_bytes"] <= section["peak_bound_bytes"]


def test_sae_row_steps_minigpt_and_saelens_from_the_same_loss(tmp_path) -> None:
    """The sae concern (--quick): both libraries' first steps on the same harvested bf16 batch from the same
    weights give the same loss, every contender is timed, and the section and both targets land in the report."""
    pytest.importorskip("sae_lens.training.sae_trainer", reason="SAELens is not installed (pip install -e '.[bench]')")
    from scripts.bench import sae

    args = cli.parse_args(["--quick", "--threads", "1", "--out", str(tmp_path), "--no-forward", "--no-load", "--sae"])
    full = cli.run(args, log=lambda _: None)
    section = full["sae"]
    rows = {r["contender"]: r for r in section["rows"]}
    assert set(rows) == {"minigpt relu", "SAELens relu", "minigpt topk", "SAELens topk"}
    assert section["saelens_skipped"] is None and section["d_sae"] == sae.EXPANSION * section["d_in"] == 8 * 64
    for activation in sae.ARCHITECTURES:
        ours, theirs = rows[f"minigpt {activation}"], rows[f"SAELens {activation}"]
        assert ours["first_step_loss"] == pytest.approx(theirs["first_step_loss"], rel=1e-5), activation
        assert section["first_step_loss_relative_difference"][activation] < 1e-5
        assert theirs["x_saelens_time"] == 1.0 and math.isfinite(ours["x_saelens_time"])
    assert all(r["median_s"] > 0 and r["rows_per_s"] > 0 and r["calls"] >= 2 for r in rows.values())
    checked = {t["key"]: t for t in full["targets"]}
    assert {"sae.step_vs_saelens", "sae.topk_step_vs_saelens"} <= set(checked)
    assert checked["sae.step_vs_saelens"]["value"] == section["target_values"]["sae.step_vs_saelens"]
    assert "### sae" in (tmp_path / "bench.md").read_text(encoding="utf-8")


def test_sae_row_without_saelens_times_minigpt_alone_and_says_so(tmp_path, monkeypatch) -> None:
    """Where SAELens cannot be imported the sae section keeps minigpt's rows, says why the others are missing,
    and reports no target value."""
    from scripts.bench import sae

    monkeypatch.setattr(sae, "saelens_version", lambda: None)
    args = cli.parse_args(["--quick", "--threads", "1", "--out", str(tmp_path), "--no-forward", "--no-load", "--sae"])
    section = sae.measure(args, log=lambda _: None)
    assert [r["contender"] for r in section["rows"]] == ["minigpt relu", "minigpt topk"]
    assert all(r["x_saelens_time"] is None and r["median_s"] > 0 for r in section["rows"])
    assert section["target_values"] == {} and section["first_step_loss_relative_difference"] == {}
    assert "SAELens is not installed" in section["saelens_skipped"]
    assert "SAELens rows skipped" in sae.markdown(section)
