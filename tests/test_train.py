"""minigpt.training: checkpoints transformers loads with equal logits, a resumed run whose losses equal
the uninterrupted run's, torchrun DDP following one process, the schedule and optimizer groups, the
shipped trained model, and refusals of what cannot work."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

from minigpt import GPT, GPTConfig, TrainingError
from minigpt.training import Settings, learning_rate, make_optimizer, train
from minigpt.training import loop as train_module

ROOT = Path(__file__).resolve().parent.parent
CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, n_positions=32)
WORDS = "the a tower river blue quickly walks over under Paris 1999 , . ; ( ) ok".split()
# Dropout on, so that a resume must restore the random generator too.
QUICK = Settings(steps=6, batch_size=2, grad_accum=2, context=16, lr=3e-3, min_lr=3e-4, warmup=2,
                 dropout=0.1, eval_every=3, eval_windows=4, val_fraction=0.2, seed=3)


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    with (d / "docs.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"text": text(i, 30 + i % 13)}) + "\n")
    return d / "docs.jsonl"


def losses(state: dict) -> list[float]:
    return [e["loss"] for e in state["log"]]


def test_checkpoint_loads_in_transformers_with_equal_logits(corpus, tmp_path) -> None:
    train(corpus, CFG, tmp_path / "run", replace(QUICK, steps=3), quiet=True)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "run", attn_implementation="eager").double().eval()
    ours = GPT.from_pretrained(tmp_path / "run", dtype=torch.float64)
    tokens = torch.randint(0, CFG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
    got = ours(tokens)
    assert (got - expected).abs().max() <= 1e-9 * expected.abs().max()
    # and the weights moved: this is not the initial model
    start = GPT.random(replace(CFG, embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1), seed=QUICK.seed)
    assert not torch.equal(start.blocks[0].attn.qkv.weight, ours.blocks[0].attn.qkv.weight.float())


def test_training_is_deterministic_and_learns(corpus, tmp_path) -> None:
    quick = replace(QUICK, steps=30, dropout=0.0, lr=2e-2, min_lr=2e-3)
    first = train(corpus, CFG, tmp_path / "a", quick, quiet=True)
    again = train(corpus, CFG, tmp_path / "b", quick, quiet=True)
    assert losses(first) == losses(again)
    assert losses(first)[-1] < losses(first)[0] - 2  # a 17-word language is quickly learnt
    val = [e["val_loss"] for e in first["log"] if "val_loss" in e]
    assert len(val) == 10 and val[-1] < val[0]


@pytest.mark.parametrize("repeat, tokens", [(0.0, "text"), (0.5, "text"), (0.5, "random")])
def test_a_resumed_run_has_the_losses_of_an_uninterrupted_one(corpus, tmp_path, monkeypatch, repeat, tokens) -> None:
    quick = replace(QUICK, repeat=repeat, repeat_tokens=tokens)
    whole = train(corpus, CFG, tmp_path / "whole", quick, save_every=2, quiet=True)

    real = train_module.learning_rate

    def interrupted(step: int, s: Settings) -> float:
        if step == 3:  # step 3 (the fourth) was begun after the checkpoint of step 2, and is lost
            raise KeyboardInterrupt
        return real(step, s)

    monkeypatch.setattr(train_module, "learning_rate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(corpus, CFG, tmp_path / "resumed", quick, save_every=2, quiet=True)
    monkeypatch.setattr(train_module, "learning_rate", real)
    saved = json.loads((tmp_path / "resumed" / "training" / "state.json").read_text())
    assert saved["step"] == 2
    resumed = train(corpus, CFG, tmp_path / "resumed", quick, save_every=2, quiet=True)
    assert losses(resumed) == losses(whole)  # bit for bit: weights, AdamW's moments, data position, dropout
    assert [e.get("val_loss") for e in resumed["log"]] == [e.get("val_loss") for e in whole["log"]]
    a, b = GPT.from_pretrained(tmp_path / "whole"), GPT.from_pretrained(tmp_path / "resumed")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # Run again when finished: nothing to do, the same state.
    assert losses(train(corpus, CFG, tmp_path / "resumed", quick, save_every=2, quiet=True)) == losses(whole)


def test_repeats_write_a_prefix_twice_in_training_windows_only_and_keep_the_order(corpus, tmp_path) -> None:
    from minigpt.training.data import SHORTEST_REPEAT, Order, Windows

    plain, repeating = Order(1000, 5), Order(1000, 5, repeat=0.3, context=256)
    a, b = plain.take(1990, 40), repeating.take(1990, 40)  # across an epoch's end
    assert a.windows == b.windows and not any(a.repeats)
    many = repeating.take(0, 1000).repeats
    assert 0.25 < sum(map(bool, many)) / 1000 < 0.35
    assert min(r for r in many if r) >= SHORTEST_REPEAT and max(many) <= 128 and len(set(many)) > 50
    windows = Windows(torch.arange(100).numpy().astype("uint16"), 10)
    inputs, targets = windows.batch([2, 3], torch.device("cpu"), [4, 0])
    assert inputs[0].tolist() == [20, 21, 22, 23, 20, 21, 22, 23, 24, 25]
    assert targets[0].tolist() == [21, 22, 23, 20, 21, 22, 23, 24, 25, 26]
    assert inputs[1].tolist() == list(range(30, 40)) and targets[1].tolist() == list(range(31, 41))
    # In a run, the training windows are the repeating ones
    quick = replace(QUICK, steps=3, eval_every=1, dropout=0.0)
    with_repeats = train(corpus, CFG, tmp_path / "r", replace(quick, repeat=1.0), quiet=True)
    without = train(corpus, CFG, tmp_path / "p", quick, quiet=True)
    assert losses(with_repeats) != losses(without)
    assert with_repeats["log"][0]["loss"] != without["log"][0]["loss"]
    with pytest.raises(TrainingError, match="repeat must be"):
        replace(quick, repeat=1.5)
    with pytest.raises(TrainingError, match="repeat needs a context of at least 16 tokens"):
        replace(quick, context=15, repeat=0.5)


def test_random_repeats_write_seeded_uniform_ids_twice_then_the_text_and_keep_the_text_draws() -> None:
    from minigpt.training.data import Order, Windows

    text, random = Order(1000, 5, repeat=0.3, context=64), Order(1000, 5, repeat=0.3, context=64, random=True)
    a, b = text.take(990, 40), random.take(990, 40)  # across an epoch's end
    assert (a.windows, a.repeats) == (b.windows, b.repeats) and not any(a.seeds)
    repeating = [seed for seed, length in zip(b.seeds, b.repeats) if length]
    assert len(repeating) > 5 and len(set(repeating)) == len(repeating)  # a seed of its own for each
    assert b == Order(1000, 5, repeat=0.3, context=64, random=True).take(990, 40)  # the same draws again
    windows = Windows(torch.arange(100).numpy().astype("uint16"), 10)
    inputs, targets = windows.batch([2, 3, 4], torch.device("cpu"), [4, 0, 5], ([7, 0, 7], 50257))
    drawn = inputs[0, :4].tolist()
    assert inputs[0].tolist() == drawn + drawn + [20, 21] and targets[0].tolist() == drawn[1:] + drawn + [20, 21, 22]
    assert inputs[2, :4].tolist() == drawn and inputs[2, 5:9].tolist() == drawn  # seed 7 again: the same ids first
    assert inputs[2, :5].tolist() == inputs[2, 5:].tolist() and targets[2, -1].item() == 40  # then window 4's text
    assert inputs[1].tolist() == list(range(30, 40))
    assert all(0 <= t < 50257 for t in drawn) and len(set(drawn)) > 1
    with pytest.raises(TrainingError, match="repeat_tokens must be one of"):
        Settings(repeat_tokens="noise")


def test_killed_while_writing_a_checkpoint_it_resumes_from_the_one_before(corpus, tmp_path, monkeypatch) -> None:
    from minigpt.training import checkpoint

    whole = train(corpus, CFG, tmp_path / "whole", QUICK, save_every=2, quiet=True)
    real = checkpoint.optimizer_tensors
    calls = {"n": 0}

    def dies_on_the_second_save(optimizer):
        calls["n"] += 1
        if calls["n"] == 2:  # step 4's weights are on disk, its optimizer state is not: not committed
            raise KeyboardInterrupt
        return real(optimizer)

    monkeypatch.setattr(checkpoint, "optimizer_tensors", dies_on_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(corpus, CFG, tmp_path / "run", QUICK, save_every=2, quiet=True)
    monkeypatch.setattr(checkpoint, "optimizer_tensors", real)
    assert checkpoint.load_state(tmp_path / "run")["step"] == 2  # the checkpoint before is whole
    assert GPT.from_pretrained(tmp_path / "run") is not None  # and DIR still loads as a model
    resumed = train(corpus, CFG, tmp_path / "run", QUICK, save_every=2, quiet=True)
    assert losses(resumed) == losses(whole)
    names = sorted(p.name for p in (tmp_path / "run" / "training").iterdir())
    assert names == ["model-6.safetensors", "optimizer-6.safetensors", "rng-6-rank0.safetensors", "state.json"]
    exported = (tmp_path / "run" / "model.safetensors").read_bytes()
    assert exported == (tmp_path / "run" / "training" / "model-6.safetensors").read_bytes()


def run_cli(*args: str, torchrun: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)] if torchrun else []
    return subprocess.run([sys.executable, *launcher, "-m", "minigpt", "train", *args], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_follow_one_with_the_same_global_batch(corpus, tmp_path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({k: v for k, v in vars(CFG).items()}))
    common = ["--data", str(corpus), "--size", str(config), "--steps", "5", "--batch-size", "2", "--context", "16",
              "--warmup", "2", "--lr", "3e-3", "--dropout", "0", "--eval-every", "5", "--eval-windows", "6",
              "--val-fraction", "0.2", "--quiet", "--device", "cpu"]
    one = run_cli(*common, "--grad-accum", "4", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(*common, "--grad-accum", "2", "--out", str(tmp_path / "two"), torchrun=2)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    a = json.loads((tmp_path / "one" / "training" / "state.json").read_text())
    b = json.loads((tmp_path / "two" / "training" / "state.json").read_text())
    assert a["world_size"] == 1 and b["world_size"] == 2 and a["global_batch"] == b["global_batch"] == 8
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)
    assert a["log"][-1]["val_loss"] == pytest.approx(b["log"][-1]["val_loss"], rel=1e-5)
    wa, wb = GPT.from_pretrained(tmp_path / "one"), GPT.from_pretrained(tmp_path / "two")
    for (name, x), y in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), name
    assert (tmp_path / "two" / "training" / "rng-5-rank1.safetensors").is_file()


def test_learning_rate_warms_up_then_follows_a_cosine() -> None:
    s = Settings(steps=110, warmup=10, lr=1.0, min_lr=0.1)
    assert learning_rate(0, s) == pytest.approx(0.1) and learning_rate(9, s) == pytest.approx(1.0)
    assert learning_rate(10, s) == pytest.approx(1.0)
    assert learning_rate(60, s) == pytest.approx(0.55)
    assert learning_rate(110, s) == pytest.approx(0.1)
    rates = [learning_rate(i, s) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_weight_decay_goes_to_matrices_and_embeddings_only() -> None:
    model = GPT.random(CFG)
    decayed, plain = make_optimizer(model, Settings(weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {names[id(p)] for p in decayed["params"]} == {n for n, p in model.named_parameters() if p.dim() == 2}
    assert "embed.weight" in {names[id(p)] for p in decayed["params"]}
    assert all(names[id(p)].endswith("bias") or "ln" in names[id(p)] for p in plain["params"])


def test_other_settings_over_a_run_are_refused_and_change_nothing(corpus, tmp_path) -> None:
    train(corpus, CFG, tmp_path / "run", replace(QUICK, steps=2), quiet=True)
    before = (tmp_path / "run" / "training" / "state.json").read_bytes()
    with pytest.raises(TrainingError, match="other settings"):
        train(corpus, CFG, tmp_path / "run", replace(QUICK, steps=2, lr=1e-3), quiet=True)
    with pytest.raises(TrainingError, match="config"):
        train(corpus, replace(CFG, n_layer=3), tmp_path / "run", replace(QUICK, steps=2), quiet=True)
    assert (tmp_path / "run" / "training" / "state.json").read_bytes() == before


def test_a_damaged_checkpoint_is_refused(corpus, tmp_path) -> None:
    train(corpus, CFG, tmp_path / "run", replace(QUICK, steps=2), quiet=True)
    weights = tmp_path / "run" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(TrainingError, match="does not match"):
        train(corpus, CFG, tmp_path / "run", replace(QUICK, steps=4), quiet=True)


def test_another_corpus_over_a_run_is_refused(corpus, tmp_path) -> None:
    train(corpus, CFG, tmp_path / "run", replace(QUICK, steps=1), quiet=True)
    other = tmp_path / "other.txt"
    other.write_text(text(99, 400))
    with pytest.raises(TrainingError, match="another corpus"):
        train(other, CFG, tmp_path / "run", replace(QUICK, steps=1), quiet=True)


def test_init_goes_on_from_a_checkpoint(corpus, tmp_path) -> None:
    first = train(corpus, CFG, tmp_path / "first", replace(QUICK, steps=20, dropout=0.0), quiet=True)
    more = train(corpus, None, tmp_path / "more", replace(QUICK, steps=5, dropout=0.0, warmup=0, lr=3e-4),
                 init=tmp_path / "first", quiet=True)
    assert more["init"] == str(tmp_path / "first")
    assert losses(more)[0] < losses(first)[0] - 1  # starts where the first run got to, not from scratch


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"batch_size": -1}, "batch_size"),
    ({"lr": -1.0}, "lr must be a finite number >= 0"),
    ({"beta2": 1.0}, r"beta2 must be in \[0, 1\)"),
    ({"dropout": 2.0}, "dropout"),
    ({"context": 64}, "longer than the model's 32 positions"),
    ({"val_fraction": 0.0}, "some text must be held out"),
    ({"lr": "fast"}, "lr must be a finite number"),
])
def test_bad_settings_are_training_errors(corpus, tmp_path, change, message) -> None:
    with pytest.raises(TrainingError, match=message):
        train(corpus, CFG, tmp_path / "run", replace(QUICK, **change), quiet=True)


def test_settings_check_themselves_when_built_and_list_every_problem() -> None:
    with pytest.raises(TrainingError, match=r"steps must be an integer >= 1, got 0; .*lr must be a finite number >= 0, got -1"):
        Settings(steps=0, lr=-1)
    with pytest.raises(TrainingError, match=r"seed must be an integer in \[0, 17592186044415\], got '0'"):
        Settings(seed="0")
    with pytest.raises(TrainingError, match=r"warmup must be an integer >= 0, got 2.5"):
        Settings(warmup=2.5)
    assert Settings(dropout=None).dropout is None and Settings(dropout=0.5).dropout == 0.5
    with pytest.raises(TrainingError, match="save_every must be a positive integer"):
        train([], CFG, "unused", QUICK, save_every=0)


def test_configs_that_cannot_train_are_refused_before_any_work(corpus, tmp_path) -> None:
    with pytest.raises(TrainingError, match="vocabulary has 1000"):
        train(corpus, replace(CFG, vocab_size=1000), tmp_path / "a", QUICK, quiet=True)
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"n_layers": 2}))
    with pytest.raises(TrainingError, match="n_layers"):
        train(corpus, typo, tmp_path / "b", QUICK, quiet=True)
    from minigpt import InputError
    with pytest.raises(InputError, match="device"):
        train(corpus, CFG, tmp_path / "c", QUICK, device="fpga", quiet=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_evaluate_leaves_the_model_in_its_mode(corpus, tmp_path) -> None:
    from minigpt.training import evaluate
    from minigpt.training.data import Windows

    train(corpus, CFG, tmp_path / "run", replace(QUICK, steps=1), quiet=True)
    model = GPT.from_pretrained(tmp_path / "run")
    windows = Windows.open(tmp_path / "run" / "data", "val", QUICK.context)
    assert math.isfinite(evaluate(model, windows, QUICK, 0, 1)) and not model.training
    model.train()
    evaluate(model, windows, QUICK, 0, 1)
    assert model.training


def test_a_corpus_too_small_or_missing_is_a_training_error(tmp_path) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("the tower")
    with pytest.raises(TrainingError, match="give more text"):
        train(tiny, CFG, tmp_path / "run", QUICK, quiet=True)
    tiny.write_text("the tower " * 5)
    with pytest.raises(TrainingError, match="less than one window"):
        train(tiny, CFG, tmp_path / "run1", QUICK, quiet=True)
    with pytest.raises(TrainingError, match="does not exist"):
        train(tmp_path / "nothing.txt", CFG, tmp_path / "run2", QUICK, quiet=True)
    with pytest.raises(TrainingError, match="neither an official size"):
        train(tiny, "gpt7", tmp_path / "run3", QUICK, quiet=True)


def test_command_line_trains_and_fails_with_one_error_line(corpus, tmp_path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 8, "n_positions": 16}))
    done = run_cli("--data", str(corpus), "--size", str(config), "--out", str(tmp_path / "run"), "--steps", "2",
                   "--batch-size", "2", "--context", "16", "--eval-every", "1", "--quiet", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "trained to step 2" in done.stderr and json.loads((tmp_path / "run" / "config.json").read_text())["n_layer"] == 1
    for args, message in [(["--size", str(config), "--init", str(tmp_path / "run")], "one of them"),
                          (["--size", str(config), "--steps", "0"], "steps must be an integer >= 1"),
                          (["--size", str(tmp_path / "missing.json")], "neither an official size")]:
        failed = run_cli("--data", str(corpus), "--out", str(tmp_path / "bad"), "--quiet", "--device", "cpu", *args)
        assert failed.returncode == 2 and failed.stderr.startswith("error: ") and message in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr


@pytest.mark.slow
def test_compiled_training_follows_the_eager_one(corpus, tmp_path) -> None:
    quick = replace(QUICK, steps=3, dropout=0.0)
    eager = train(corpus, CFG, tmp_path / "eager", quick, quiet=True)
    compiled = train(corpus, CFG, tmp_path / "compiled", quick, compile=True, quiet=True)
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
