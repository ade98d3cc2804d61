"""Hostile checkpoints: absurd configs, files that are not
files, links out of the directory, a tensor under two names, NaN after conversion, zero-copy loading.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
from hf_reference import make_hf, write_checkpoint
from safetensors.torch import load_file, save_file
from test_fuzz import watchdog

from minigpt import GPT, CheckpointError, MiniGPTWarning

CONFIG = dict(vocab_size=40, n_positions=10, n_embd=8, n_layer=2, n_head=2)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return write_checkpoint(make_hf(CONFIG, seed=5, dtype=torch.float32), tmp_path_factory.mktemp("good"))


@pytest.fixture
def ckpt(good, tmp_path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "ckpt"))


def refused(directory: Path, *fragments: str, within: float = 10.0) -> None:
    """Loading fails at once, with a CheckpointError holding every fragment."""
    start = time.monotonic()
    with watchdog(int(within) + 5), pytest.raises(CheckpointError) as info:
        GPT.from_pretrained(directory)
    assert time.monotonic() - start < within
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


# ---------------------------------------------------------------------------------------------
# Item 2: the config is checked against the files' headers before anything is built


@pytest.mark.parametrize("changes", [dict(n_layer=10**9), dict(n_embd=2**40, n_head=1), dict(vocab_size=10**12),
                                     dict(n_inner=10**12)], ids=["blocks", "width", "vocabulary", "mlp"])
@pytest.mark.parametrize("weights", ["as they are", "none", "empty index"])
def test_an_absurd_config_fails_at_once_whatever_the_weights(ckpt, changes, weights) -> None:
    edit_config(ckpt, **changes)
    if weights == "none":
        (ckpt / "model.safetensors").unlink()
    elif weights == "empty index":
        (ckpt / "model.safetensors").unlink()
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    refused(ckpt, "model.safetensors" if weights == "none" else "describe different models")


# ---------------------------------------------------------------------------------------------
# Item 3: only regular files inside the checkpoint directory are opened


def test_a_named_pipe_is_refused_without_opening_it(ckpt) -> None:
    for name in ("model.safetensors", "config.json"):
        spoilt = Path(shutil.copytree(ckpt, ckpt.parent / f"pipe-{name}"))
        (spoilt / name).unlink()
        os.mkfifo(spoilt / name)  # opening it for reading would wait forever for a writer
        refused(spoilt, name, "named pipe", "not a regular file")


def test_a_device_or_a_directory_is_refused(ckpt) -> None:
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to("/dev/zero")
    refused(ckpt, "outside the checkpoint directory")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").mkdir()
    refused(ckpt, "is a directory")


def test_links_may_point_inside_the_directory_but_not_out(ckpt, tmp_path) -> None:
    (ckpt / "weights").mkdir()
    (ckpt / "model.safetensors").rename(ckpt / "weights" / "real.safetensors")
    (ckpt / "model.safetensors").symlink_to(Path("weights") / "real.safetensors")
    assert GPT.from_pretrained(ckpt).cfg.n_layer == 2
    outside = tmp_path / "elsewhere.safetensors"
    (ckpt / "weights" / "real.safetensors").rename(outside)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(outside)
    refused(ckpt, "outside the checkpoint directory", str(outside))


def test_a_shard_that_is_a_directory_or_a_link_out_is_refused(ckpt, tmp_path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    keys = sorted(tensors)
    save_file({k: tensors[k] for k in keys[:10]}, str(ckpt / "a.safetensors"))
    save_file({k: tensors[k] for k in keys[10:]}, str(tmp_path / "b.safetensors"))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**{k: "a.safetensors" for k in keys[:10]}, **{k: "b.safetensors" for k in keys[10:]}}}))
    (ckpt / "b.safetensors").symlink_to(tmp_path / "b.safetensors")
    refused(ckpt, "b.safetensors", "outside the checkpoint directory")
    (ckpt / "b.safetensors").unlink()
    shutil.copy(tmp_path / "b.safetensors", ckpt / "b.safetensors")
    assert GPT.from_pretrained(ckpt).cfg.n_layer == 2  # the same shards, inside: fine


# ---------------------------------------------------------------------------------------------
# Item 4: one tensor under two names; NaN checked as the weights will be used


def test_a_tensor_under_two_names_loads_only_if_both_are_equal(ckpt) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    plain = GPT.from_pretrained(ckpt)
    save_file({**tensors, "transformer.h.0.ln_1.weight": tensors["h.0.ln_1.weight"].clone()},
              str(ckpt / "model.safetensors"))
    twice = GPT.from_pretrained(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), twice.state_dict().values()))
    save_file({**tensors, "transformer.h.0.ln_1.weight": tensors["h.0.ln_1.weight"] + 1},
              str(ckpt / "model.safetensors"))
    refused(ckpt, "'h.0.ln_1.weight'", "'transformer.h.0.ln_1.weight'", "ambiguous")


def test_a_nan_in_a_tied_head_does_not_look_untied(ckpt) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["wte.weight"][3, 1] = float("nan")
    save_file({**tensors, "lm_head.weight": tensors["wte.weight"].clone()}, str(ckpt / "model.safetensors"))
    with pytest.warns(MiniGPTWarning, match="NaN or inf in 1 tensors .*embed.weight"):
        GPT.from_pretrained(ckpt)
    tensors["wte.weight"][3, 2] = 7.0
    save_file({**tensors, "lm_head.weight": load_file(str(ckpt / "model.safetensors"))["lm_head.weight"]},
              str(ckpt / "model.safetensors"))
    refused(ckpt, "lm_head.weight differs from wte.weight")


def test_an_overflow_in_float16_is_reported(ckpt) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["h.1.mlp.c_fc.weight"][0, 0] = 1e6  # fine in float32, inf in float16
    save_file(tensors, str(ckpt / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MiniGPTWarning)
        GPT.from_pretrained(ckpt)  # float32: no warning
    with pytest.warns(MiniGPTWarning, match="NaN or inf in 1 tensors .*blocks.1.mlp.fc.weight.*float16"):
        GPT.from_pretrained(ckpt, dtype=torch.float16)


# ---------------------------------------------------------------------------------------------
# Item 1: the parameters are the file's own memory-mapped tensors when nothing needs converting


def mapped_from(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (Linux's /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_parameters_are_the_files_tensors_unless_converted(good) -> None:
    same = GPT.from_pretrained(good)
    ranges = mapped_from(good / "model.safetensors")

    def in_file(p: torch.Tensor) -> bool:
        return any(start <= p.data_ptr() < end for start, end in ranges)

    # A float32 parameter is the mapped file's tensor where the file aligns it as torch aligns its own
    # memory (64 bytes), else an aligned copy: the same weights give the same bits however they came.
    aligned = [p.data_ptr() % 64 == 0 for p in same.parameters()]
    assert all(aligned)
    mapped = [in_file(p) for p in same.parameters()]
    assert ranges and any(mapped), "float32 parameters the file aligns are the mapped file's"
    converted = GPT.from_pretrained(good, dtype=torch.float64)
    assert not any(in_file(p) for p in converted.parameters())
    tokens = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(same(tokens).double(), converted(tokens), rtol=1e-5, atol=1e-5)
    # A loaded model's weights may be changed in place (copy-on-write): the file stays as it was.
    with torch.no_grad():
        same.blocks[0].ln1.weight.add_(1.0)
    assert not torch.equal(GPT.from_pretrained(good).blocks[0].ln1.weight, same.blocks[0].ln1.weight)


# ---------------------------------------------------------------------------------------------
# JSON of the wrong type or shape: config.json and the shard index are read with limits, checked by type


HOSTILE_JSON = {
    "a list activation": lambda c: json.dumps({**c, "activation_function": ["gelu_new"]}),
    "a dict activation": lambda c: json.dumps({**c, "activation_function": {"name": "gelu_new"}}),
    "a 5,000-digit number": lambda c: json.dumps(c)[:-1] + ', "n_ctx": ' + "9" * 5000 + "}",
    "nesting 100,000 deep": lambda c: json.dumps(c)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
}
HOSTILE_MESSAGE = {"a list activation": "activation_function ['gelu_new'] is not supported",
                   "a dict activation": "activation_function {'name': 'gelu_new'} is not supported",
                   "a 5,000-digit number": "a number of 5000 characters", "nesting 100,000 deep": "nested more than 64"}


@pytest.mark.parametrize("case", list(HOSTILE_JSON))
def test_a_hostile_config_is_a_checkpoint_error(ckpt, case) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(HOSTILE_JSON[case](config))
    refused(ckpt, "config.json", HOSTILE_MESSAGE[case])


@pytest.mark.parametrize("case", ["a 5,000-digit number", "nesting 100,000 deep", "a list", "a string map"])
def test_a_hostile_shard_index_is_a_checkpoint_error(ckpt, case) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").rename(ckpt / "a.safetensors")
    index = {"weight_map": {k: "a.safetensors" for k in tensors}}
    text = {"a list": json.dumps([index]), "a string map": json.dumps({"weight_map": "a.safetensors"})}.get(case)
    (ckpt / "model.safetensors.index.json").write_text(text or HOSTILE_JSON[case](index))
    refused(ckpt, "model.safetensors.index.json")


def test_a_hostile_config_through_minigpt_trace_is_one_error_line(ckpt) -> None:
    import subprocess
    import sys

    config = json.loads((ckpt / "config.json").read_text())
    for case in HOSTILE_JSON:
        (ckpt / "config.json").write_text(HOSTILE_JSON[case](config))
        done = subprocess.run([sys.executable, "-m", "minigpt", "trace", "hi", "--model", str(ckpt)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith("error: ") and HOSTILE_MESSAGE[case] in done.stderr


@pytest.mark.parametrize("kind", ["a named pipe", "a device", "a directory"])
def test_a_tokenizer_file_that_is_not_a_regular_file_is_refused_unread(tmp_path, monkeypatch, kind) -> None:
    from minigpt.errors import TokenizerError
    from minigpt.tokenizer import gpt2_tokenizer

    path = {"a named pipe": tmp_path / "pipe", "a device": Path("/dev/zero"), "a directory": tmp_path}[kind]
    if kind == "a named pipe":
        os.mkfifo(path)  # reading it would wait forever for a writer
    monkeypatch.setenv("MINIGPT_TOKENIZER_FILE", str(path))
    gpt2_tokenizer.cache_clear()
    try:
        with watchdog(20), pytest.raises(TokenizerError, match=f"{kind}, not a regular file; it is not GPT-2's "
                                                                "vocabulary: point MINIGPT_TOKENIZER_FILE at"):
            gpt2_tokenizer()
    finally:
        gpt2_tokenizer.cache_clear()  # the next test builds the tokenizer from the real file again


def test_setup_refuses_a_pipe_given_as_file(tmp_path) -> None:
    from minigpt.errors import TokenizerError
    from minigpt.vocabulary import setup_vocabulary

    os.mkfifo(tmp_path / "pipe")
    with watchdog(20), pytest.raises(TokenizerError, match="named pipe, not a regular file"):
        setup_vocabulary(tmp_path / "pipe", say=lambda line: None)
