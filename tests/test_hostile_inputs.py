"""Hostile inputs for long runs: corpora and training settings refused up front, naming the file, the
line and the way out; a training step that cannot fit refused before the model is built; masks,
edit helpers and generation refusing what they cannot honour; NumPy integers taken as integers."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from minigpt import GPT, EditError, GPTConfig, HarvestError, InputError, MemoryBudgetError, TrainingError, edits
from minigpt.checks import check_int, is_integer
from minigpt.cli import main
from minigpt.corpus import corpus_files, documents
from minigpt.inputs import check_mask
from minigpt.memory import available_memory
from minigpt.training import Settings, train
from minigpt.training import loop as train_module
from minigpt.training.settings import MAX_SEED, check_fits

CFG = GPTConfig(vocab_size=50, n_positions=12, n_embd=8, n_layer=2, n_head=2)
MODEL = GPT.random(CFG, seed=4)
TOKENS = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
TRAIN_CFG = GPTConfig(n_layer=1, n_head=2, n_embd=8, n_positions=32)
QUICK = Settings(steps=2, batch_size=2, context=16, eval_every=1, eval_windows=2, val_fraction=0.2)
MEMORY_READABLE = available_memory(torch.device("cpu")) is not None


def logits(**options) -> torch.Tensor:
    return MODEL.run(TOKENS, **options)[0]


def read_all(data, error=TrainingError, lines: bool = False) -> list[str]:
    return [doc.text for doc in documents(corpus_files(data, error), lines, error)]


# ---------------------------------------------------------------------------------------------
# Corpora


@pytest.mark.parametrize("error", [TrainingError, HarvestError])
@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', r"bad\.jsonl, line 2: not UTF-8 \(byte b'\\xe9'"),
    ("deep.jsonl", b'{"text": "a"}\n{"text": "b", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}\n",
     r"deep\.jsonl, line 2: not JSON \(nested more than 64 deep\)"),
    ("number.jsonl", b'{"text": "a", "n": 1' + b"0" * 400 + b"}\n", r"number\.jsonl, line 1: not JSON \(a number of 401"),
    ("bad.txt", b"fine\nalso fine\nnot \xff fine\n", r"bad\.txt, (line 3|the text): not UTF-8"),
])
def test_hostile_files_name_the_file_and_the_line(tmp_path, error, name, content, message) -> None:
    (tmp_path / name).write_bytes(content)
    for lines in (False, True):
        with pytest.raises(error, match=message):
            read_all(tmp_path / name, error, lines)


def test_a_text_file_not_utf8_names_its_line_when_read_by_lines(tmp_path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"one\ntwo\r\nthree \xc3\n")
    with pytest.raises(TrainingError, match=r"bad\.txt, line 3: not UTF-8 \(byte b'\\xc3' at character 7\)"):
        read_all(tmp_path / "bad.txt", lines=True)
    (tmp_path / "good.txt").write_bytes("one\ntwo\r\nthr\u00e9e\n".encode())
    assert read_all(tmp_path / "good.txt", lines=True) == ["one", "two", "thr\u00e9e"]


def test_a_parquet_file_with_damaged_pages_is_refused_naming_it(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    texts = [f"document {i} " + "abcdefgh"[i % 8] * (i % 97) for i in range(4000)]
    parquet.write_table(pa.table({"text": texts}), tmp_path / "ok.parquet", compression="none", row_group_size=1000)
    assert read_all(tmp_path / "ok.parquet") == texts
    damaged = bytearray((tmp_path / "ok.parquet").read_bytes())
    for i in range(len(damaged) // 3, 2 * len(damaged) // 3, 3):
        damaged[i] = (damaged[i] * 31 + 7) % 256
    (tmp_path / "bad.parquet").write_bytes(bytes(damaged))
    with pytest.raises(HarvestError, match=r"bad\.parquet(: rows from \d+ cannot be read| is not a readable)"):
        read_all(tmp_path / "bad.parquet", HarvestError)
    parquet.write_table(pa.table({"text": ["fine", None, "also fine"]}), tmp_path / "null.parquet")
    with pytest.raises(HarvestError, match=r"null\.parquet, row 1: the 'text' value is None, not a string"):
        read_all(tmp_path / "null.parquet", HarvestError)
    parquet.write_table(pa.table({"text": [b"\x00" * 10**6]}), tmp_path / "bytes.parquet")
    with pytest.raises(HarvestError, match=r"row 0: the 'text' value is b'[\\x0]{60,80}\.\.\. \(4,000,003 characters\), not a string"):
        read_all(tmp_path / "bytes.parquet", HarvestError)


@pytest.mark.parametrize("data, message", [
    (None, "must be a path"), (5, "must be a path"), (b"corpus.txt", "must be a path"), (["a.txt", 3], "must be a path"),
    ("", "empty corpus path"), ([], "no corpus given"),
    ("x" * 5000, r"cannot look at corpus file 'x{20,80}\.\.\. \(5,002 characters\) \(File name too long\)"),
])
def test_a_corpus_that_is_not_paths_is_refused(data, message) -> None:
    for error in (TrainingError, HarvestError):
        with pytest.raises(error, match=message):
            corpus_files(data, error)


def test_training_refuses_a_hostile_corpus_with_its_error(tmp_path) -> None:
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a b c"}\n\xff\n')
    with pytest.raises(TrainingError, match=r"bad\.jsonl, line 2: not UTF-8"):
        train(tmp_path / "bad.jsonl", TRAIN_CFG, tmp_path / "run", QUICK, quiet=True)


# ---------------------------------------------------------------------------------------------
# Training settings


@pytest.mark.parametrize("change, message", [
    ({"lr": math.inf}, "lr must be a finite number >= 0, got inf"),
    ({"lr": math.nan}, "lr must be a finite number >= 0, got nan"),
    ({"min_lr": -math.inf}, "min_lr must be a finite number >= 0"),
    ({"min_lr": 1.0, "lr": 0.1}, r"min_lr \(1.0\) must be <= lr \(0.1\)"),
    ({"weight_decay": math.inf}, "weight_decay must be a finite number >= 0"),
    ({"grad_clip": math.inf}, "grad_clip must be a finite number >= 0"),
    ({"beta1": math.nan}, "beta1 must be a finite number in"),
    ({"beta1": 1}, r"beta1 must be in \[0, 1\)"),
    ({"beta2": -0.1}, "beta2 must be a finite number in"),
    ({"dropout": math.nan}, "dropout must be a finite number in"),
    ({"val_fraction": 1.0}, "some text must be held out"),
    ({"seed": 2**64}, rf"seed must be an integer in \[0, {MAX_SEED}\], got {2**64}"),
    ({"seed": MAX_SEED + 1}, "seed must be an integer in"),
    ({"seed": -1}, "seed must be an integer in"),
    ({"seed": 1.0}, "seed must be an integer in"),
    ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
    ({"grad_accum": 2.0}, "grad_accum must be an integer >= 1, got 2.0"),
    ({"warmup": -1}, "warmup must be an integer >= 0"),
    ({"context": np.float64(16)}, "context must be an integer >= 1"),
])
def test_hostile_training_settings_are_refused_when_built(change, message) -> None:
    with pytest.raises(TrainingError, match=message):
        replace(QUICK, **change)


def test_the_largest_seed_runs_the_window_order_and_numpy_numbers_become_python_ones() -> None:
    from minigpt.training.data import Order

    # the order's generator takes seed * 1_000_003 + epoch
    assert len(Order(10, MAX_SEED, repeat=0.5, context=64).take(0, 25).windows) == 25
    s = Settings(batch_size=np.int64(4), seed=np.uint32(7), lr=np.float32(0.5), min_lr=np.float64(0.25))
    assert (s.batch_size, s.seed, s.lr, s.min_lr) == (4, 7, 0.5, 0.25)
    assert all(type(v) in (int, float) for v in (s.batch_size, s.seed, s.lr, s.min_lr))
    json.dumps(s.__dict__)  # the run's identity is written as JSON
    assert type(Settings(lr=1).lr) is int  # Python's own numbers stay as given (a resumed run compares them)


@pytest.mark.skipif(not MEMORY_READABLE, reason="free memory cannot be read here")
@pytest.mark.parametrize("cfg, change, part", [
    (GPTConfig(n_layer=10**9), {}, "the weights"),
    (TRAIN_CFG, {"batch_size": 10**9}, "activations"),
    (TRAIN_CFG, {"grad_accum": 10**12}, "the step's windows"),
])
def test_a_training_step_that_cannot_fit_is_refused_before_the_model_is_built(
        tmp_path, monkeypatch, cfg, change, part) -> None:
    monkeypatch.setattr(train_module.GPT, "random", lambda *a, **k: pytest.fail("the model was built"))
    (tmp_path / "docs.txt").write_text("a few words of text " * 50)
    settings = replace(QUICK, context=16, **change)
    with pytest.raises(MemoryBudgetError, match=rf"training would need about .*{part} \d.* free on cpu now; use a "
                                                r"smaller --batch-size"):
        train(tmp_path / "docs.txt", cfg, tmp_path / "run", settings, quiet=True)
    assert not (tmp_path / "run" / "data").exists()  # refused before the corpus was tokenized


@pytest.mark.skipif(not MEMORY_READABLE, reason="free memory cannot be read here")
def test_the_command_refuses_absurd_sizes_and_hostile_options_with_one_error_line(tmp_path, capsys) -> None:
    (tmp_path / "docs.txt").write_text("a few words of text " * 50)
    absurd = tmp_path / "absurd.json"
    absurd.write_text(json.dumps({"n_layer": 10**9, "n_head": 2, "n_embd": 8, "n_positions": 256}))
    common = ["train", "--data", str(tmp_path / "docs.txt"), "--out", str(tmp_path / "run"), "--quiet", "--device", "cpu"]
    for extra, message in [(["--size", str(absurd)], "training would need about"),
                           (["--size", "gpt2", "--lr", "inf"], "lr must be a finite number >= 0, got inf"),
                           (["--size", "gpt2", "--beta1", "nan"], "beta1 must be a finite number in [0, 1], got nan"),
                           (["--size", "gpt2", "--seed", str(2**64)], "seed must be an integer in"),
                           (["--size", "gpt2", "--threads", str(2**40)], "--threads must be an integer in [1, 65536]")]:
        assert main(common + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "data").exists()
    assert main(["train", "--data", "", "--size", "gpt2", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "empty corpus path" in capsys.readouterr().err


def test_a_training_step_that_fits_passes_the_memory_check() -> None:
    check_fits(QUICK, TRAIN_CFG, torch.device("cpu"))
    check_fits(Settings(), GPTConfig(), "cpu")


# ---------------------------------------------------------------------------------------------
# Attention masks


@pytest.mark.parametrize("mask, message", [
    (torch.ones(2, 5).to_sparse(), "dense tensor .* layout torch.sparse_coo"),
    (torch.ones(2, 5, device="meta"), "on the meta device"),
    (torch.tensor([[1, 1, 0.5, 1, 1], [1, 1, 1, 1, 1]]), "only 0 .* and 1 .*got 0.5"),
    (torch.tensor([[1, 1, math.nan, 1, 1], [1, 1, 1, 1, 1]]), "only 0 .* and 1 .*got nan"),
    (torch.tensor([[1, 1, 2, 1, 1], [1, 1, 1, 1, 1]]), "only 0 .* and 1 .*got 2"),
    (torch.ones(2, 4), r"shape \(2, 4\) but the tokens have shape \(2, 5\)"),
    (torch.ones(1, 5), r"shape \(1, 5\)"),
    ([[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], "row 1 has no real token"),
    ("11111", "must be a tensor"),
])
def test_a_hostile_attention_mask_is_an_input_error(mask, message) -> None:
    with pytest.raises(InputError, match=message):
        MODEL.run(TOKENS, attention_mask=mask)
    with pytest.raises(InputError, match=message):
        MODEL.generate(TOKENS, 2, attention_mask=mask)


def test_a_mask_on_another_device_than_the_tokens_and_the_model_is_refused() -> None:
    mask = torch.ones(2, 5)
    assert check_mask(mask, (2, 5), (torch.device("cpu"), torch.device("cpu"))) is None
    with pytest.raises(InputError, match=r"attention_mask is on cpu, the tokens on cuda:0 and the model on cuda:0; "
                                         r"move it: attention_mask.to\('cuda:0'\)"):
        check_mask(mask, (2, 5), (torch.device("cuda:0"), torch.device("cuda:0")))


def test_a_float_mask_of_zeros_and_ones_is_honoured() -> None:
    as_bool = logits(attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    as_float = logits(attention_mask=torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert torch.equal(as_bool, as_float)


# ---------------------------------------------------------------------------------------------
# Edit helpers


BAD_CHOICES = [True, 1.0, np.float64(2), [1, 2.5], [True], slice(0, None, 0), slice(0.5, 3), slice(None, "2"),
               torch.tensor([0.0]), torch.tensor([True]), torch.zeros(2, 2, dtype=torch.long), {1}]


@pytest.mark.parametrize("chosen", BAD_CHOICES)
def test_edit_helpers_refuse_positions_and_heads_that_are_not_indices(chosen) -> None:
    source = torch.zeros(1, 5, 8)
    makers = [lambda **k: edits.patch(source, "blocks.0.attn.z", **k),
              lambda **k: edits.zero_ablate("blocks.0.attn.z", **k),
              lambda **k: edits.mean_ablate("blocks.0.attn.z", source, **k)]
    for make in makers:
        for keyword in ("positions", "heads"):
            with pytest.raises(EditError, match=f"{keyword}="):
                make(**{keyword: chosen})


def test_last_is_a_position_but_not_a_head() -> None:
    """``positions="last"`` is each row's last real token; a head has no "last"."""
    source = torch.zeros(1, 5, 8)
    assert "blocks.0.attn.z" in edits.zero_ablate("blocks.0.attn.z", positions="last")
    for make in (lambda: edits.patch(source, "blocks.0.attn.z", heads="last"),
                 lambda: edits.zero_ablate("blocks.0.attn.z", heads="last"),
                 lambda: edits.mean_ablate("blocks.0.attn.z", source, heads="last")):
        with pytest.raises(EditError, match="heads="):
            make()


@pytest.mark.parametrize("source, message", [(None, "patch needs a source"), ([torch.zeros(1, 5, 8)], "got list")])
def test_patch_refuses_a_source_of_none_or_a_list(source, message) -> None:
    with pytest.raises(EditError, match=message):
        edits.patch(source, "blocks.0.resid_post")
    if source is not None:
        with pytest.raises(EditError, match=message):
            edits.mean_ablate("blocks.0.resid_post", source)


def test_numpy_integers_are_taken_wherever_python_ints_are() -> None:
    assert is_integer(np.int64(3)) and is_integer(np.uint8(3)) and not is_integer(np.bool_(True))
    assert not is_integer(True) and not is_integer(np.float64(3))
    assert type(check_int(np.int32(5), "n", 0, 9)) is int
    _, clean = MODEL.run(TOKENS, taps="*")
    for numpy_choice, python_choice in [(np.int64(-1), -1), ([np.int64(0), np.int32(2)], [0, 2]),
                                        (np.array([1, 3]), [1, 3]), (slice(np.int64(1), None, np.int64(2)), slice(1, None, 2))]:
        for make in (lambda c: edits.zero_ablate("blocks.0.attn.z", positions=c),
                     lambda c: edits.patch(clean, "blocks.1.resid_pre", positions=c),
                     lambda c: edits.mean_ablate("blocks.0.mlp.post", positions=c)):
            assert torch.equal(logits(edits=make(numpy_choice)), logits(edits=make(python_choice)))
    assert torch.equal(logits(edits=edits.zero_head_keys(np.int64(1), np.int64(1))),
                       logits(edits=edits.zero_head_keys(1, 1)))


def test_numpy_integers_reach_torch_and_json_as_python_ones(tmp_path) -> None:
    """Accepted means it works: a seed reaches torch.Generator (which refuses NumPy's ints) and a
    size reaches the JSON files written (which json.dumps refuses)."""
    i = np.int64
    model = GPT.random(GPTConfig(vocab_size=i(50), n_positions=i(12), n_embd=i(8), n_layer=i(2), n_head=i(2)), seed=i(4))
    assert torch.equal(logits(), model.run(TOKENS)[0])
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["n_layer"] == 2
    ids = MODEL.generate(TOKENS, i(3), top_k=i(5), seed=i(2), stop_at_eos=True, eos_id=i(7))
    assert torch.equal(ids, MODEL.generate(TOKENS, 3, top_k=5, seed=2, stop_at_eos=True, eos_id=7))
    assert torch.equal(MODEL.generate(TOKENS, 2, seed=[i(1), i(2)]), MODEL.generate(TOKENS, 2, seed=[1, 2]))


@pytest.mark.parametrize("neurons", [[1.5, 2], [0.0], torch.tensor([1.0, 2.0]), [True, False], torch.tensor([True]),
                                     slice(0.5, 4), slice(0, 8, 0), [[0, 1], [2, 3]], object()])
def test_noise_neurons_refuses_indices_that_are_not_integers(neurons) -> None:
    with pytest.raises(EditError, match="neuron"):
        edits.noise_neurons(0, neurons)


def test_noise_neurons_takes_numpy_indices_and_seeds_as_python_ones() -> None:
    a = logits(edits=edits.noise_neurons(0, np.array([1, 5]), seed=np.int64(2)))
    assert torch.equal(a, logits(edits=edits.noise_neurons(0, [1, 5], seed=2)))
    for seed in (1.0, True, 2**64, "2"):
        with pytest.raises(EditError, match="seed must be an integer"):
            edits.noise_neurons(0, seed=seed)
    with pytest.raises(EditError, match=r"neuron indices must lie in \[0, 32\)"):
        MODEL.run(TOKENS, edits=edits.noise_neurons(0, [40]))
