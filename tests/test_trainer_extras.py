"""The trainer's extras: metrics.jsonl every step, a sample at each evaluation, the loss curve, the whole
validation split at the end, ``minigpt eval``, --steps raised on a run (its schedule stated), threads recorded."""
from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from minigpt import GPTConfig, TrainingError
from minigpt.cli import main
from minigpt.training import Settings, learning_rate, train
from minigpt.training import eval as extras

CFG = GPTConfig(n_layer=1, n_head=2, n_embd=16, n_positions=32)
WORDS = "the a tower river blue quickly walks over under Paris 1999 , . ; ( ) ok".split()
QUICK = Settings(steps=4, batch_size=2, context=16, lr=3e-3, min_lr=3e-4, warmup=1, dropout=0.1, eval_every=2,
                 eval_windows=2, val_fraction=0.2, seed=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    with (d / "docs.jsonl").open("w") as f:
        for i in range(30):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(30 + i % 7))}) + "\n")
    return d / "docs.jsonl"


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "run"
    return out, train(corpus, CFG, out, QUICK, save_every=2, quiet=True)


def test_metrics_file_has_a_line_per_step(run) -> None:
    out, state = run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for m, entry in zip(lines, state["log"]):
        assert m["loss"] == entry["loss"] and m["lr"] == entry["lr"] and m["grad_norm"] == entry["grad_norm"]
        assert m["tokens_per_s"] > 0 and m["mfu"] is None  # a CPU states no peak
    assert [m["step"] for m in lines if "val_loss" in m] == [2, 4]


def test_a_seeded_sample_at_each_evaluation_and_the_whole_split_at_the_end(run) -> None:
    _, state = run
    samples = [e["sample"] for e in state["log"] if "val_loss" in e]
    assert len(samples) == 2 and all(isinstance(x, str) and x for x in samples)
    assert "val_loss_full" in state["log"][-1] and all("val_loss_full" not in e for e in state["log"][:-1])


def test_the_last_loss_is_read_against_counting_on_the_same_windows(run) -> None:
    """The final entry carries the baselines computed on every validation window, as val_loss_full is."""
    import math

    from minigpt.training import baselines, data

    out, state = run
    last = state["log"][-1]
    assert set(last["baselines"]) >= {"uniform", "unigram", "bigram_add_k", "bigram_interpolated"}
    assert last["baselines"]["uniform"] == math.log(50257)
    settings = state["settings"]
    train = data.Windows.open(out / "data", "train", settings["context"])
    val = data.Windows.open(out / "data", "val", settings["context"])
    assert last["baselines"] == baselines.baselines(train.tokens, val, 50257), "the same windows, the same numbers"


def test_loss_curve_written_beside_the_checkpoint(run) -> None:
    out, _ = run
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_command_gives_the_loss_over_every_window(run, corpus, capsys) -> None:
    out, state = run
    main(["eval", "--model", str(out), "--data", str(corpus), "--context", "16", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] == pytest.approx(torch.tensor(result["loss"]).exp().item())
    assert result["windows"] == result["tokens"] // 16 and result["windows"] > 2
    assert 0 < result["loss"] < 2 * state["log"][0]["loss"]
    # A training run's own tokens give the baselines on the same windows beside it.
    assert result["baselines"]["uniform"] == pytest.approx(math.log(50257))
    assert result["baselines"]["bigram_interpolated"] < result["baselines"]["uniform"]


def test_steps_raised_on_a_finished_run_goes_on_at_min_lr(run, corpus, tmp_path) -> None:
    out, state = run
    done = tmp_path / "more"
    import shutil
    shutil.copytree(out, done)
    longer = train(corpus, CFG, done, replace(QUICK, steps=6), save_every=2, quiet=True)
    assert longer["step"] == 6 and longer["schedule_steps"] == 4
    assert [e["loss"] for e in longer["log"][:4]] == [e["loss"] for e in state["log"]]
    assert [e["lr"] for e in longer["log"][4:]] == [QUICK.min_lr] * 2 == [learning_rate(s, QUICK) for s in (4, 5)]
    lines = [json.loads(line)["step"] for line in (done / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2, 3, 4, 5, 6]
    with pytest.raises(TrainingError, match="fewer"):
        train(corpus, CFG, done, replace(QUICK, steps=5), quiet=True)


def test_threads_recorded_and_another_count_said_plainly(run, corpus, tmp_path, capsys) -> None:
    out, state = run
    assert state["threads"] == torch.get_num_threads()
    saved = json.loads((out / "training" / "state.json").read_text())
    assert saved["threads"] == torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        train(corpus, CFG, out, QUICK, quiet=True)  # finished: nothing to do, but the count is told
    finally:
        torch.set_num_threads(before)
    assert "not be bit-exact" in capsys.readouterr().err


def test_mfu_against_a_stated_peak() -> None:
    per_token = extras.flops_per_token(CFG, 1000, 16)
    assert per_token == 6 * 1000 + 12 * 1 * 16 * 16
    assert extras.mfu(1e6, per_token, 1e12) == pytest.approx(1e6 * per_token / 1e12)
    assert extras.mfu(1e6, per_token, None) is None and extras.peak_flops(torch.device("cpu")) is None


def test_eval_refuses_a_context_the_model_lacks_and_too_little_text(run, corpus, tmp_path) -> None:
    from minigpt import GPT

    model = GPT.from_pretrained(run[0])
    with pytest.raises(TrainingError, match=r"--context 64 must be in 1\.\.32"):
        extras.evaluate_file(model, [corpus], context=64)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(TrainingError, match="less than one window"):
        extras.evaluate_file(model, [short], context=16)


def test_precision_bf16_autocasts_the_forward_on_a_cpu_and_is_part_of_the_run(corpus, run, tmp_path) -> None:
    """--precision bf16 trains under bf16 autocast on a CPU (losses differ from float32's, stay finite);
    resuming it with another precision is refused; a bad value is refused when the settings are built."""
    with pytest.raises(TrainingError, match="precision must be one of 'auto', 'bf16', 'fp32', got 'fp16'"):
        Settings(precision="fp16")
    assert Settings(precision="bf16").autocast("cpu") and not Settings().autocast("cpu")
    assert Settings().autocast("cuda") and not Settings(precision="fp32").autocast("cuda")
    out = tmp_path / "bf16"
    state = train(corpus, CFG, out, replace(QUICK, precision="bf16"), save_every=2, quiet=True)
    fp32 = [e["loss"] for e in run[1]["log"]]
    bf16 = [e["loss"] for e in state["log"]]
    assert all(math.isfinite(x) for x in bf16) and bf16 != fp32
    assert bf16[0] == pytest.approx(fp32[0], abs=0.05)  # the same model and windows, computed in bf16
    with pytest.raises(TrainingError, match="other settings"):
        train(corpus, CFG, out, replace(QUICK, precision="fp32"), save_every=2, quiet=True)


def test_a_run_saved_before_precision_existed_resumes_as_auto(corpus, tmp_path) -> None:
    out = tmp_path / "old"
    short = replace(QUICK, steps=2)
    train(corpus, CFG, out, short, save_every=2, quiet=True)
    state_file = out / "training" / "state.json"
    state = json.loads(state_file.read_text())
    del state["settings"]["precision"]  # as written before the field existed
    state_file.write_text(json.dumps(state))
    assert train(corpus, CFG, out, replace(short, steps=4), save_every=2, quiet=True)["step"] == 4
