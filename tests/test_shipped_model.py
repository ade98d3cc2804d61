"""The small trained GPT-2s shipped in minigpt/assets: docs-small (the offline default) and pydoc-tiny.
Their records, transformers loading them with equal logits, that they are trained (docs-small: better
than counting on its whole validation split, with induction heads), and that the main job falls back
to docs-small offline (and --random does not)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel

from minigpt import GPT, GPTConfig
from minigpt.weights import SHIPPED

ROOT = Path(__file__).resolve().parent.parent
DIRECTORY = SHIPPED["pydoc-tiny"]
DOC_TEXT = ("The :func:`open` function returns a :term:`file object`. If the file cannot be opened, an "
            ":exc:`OSError` is raised. See the :mod:`io` module for more details.")


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((DIRECTORY / "TRAINING.json").read_text(encoding="utf-8"))


def test_the_record_describes_the_files_beside_it(record) -> None:
    config = json.loads((DIRECTORY / "config.json").read_text(encoding="utf-8"))
    assert GPTConfig.from_hf(config) == GPTConfig(**record["config"])
    model = GPT.from_pretrained("pydoc-tiny")
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    assert (DIRECTORY / "model.safetensors").stat().st_size <= 10 * 2**20
    corpus = record["corpus"]
    assert corpus["package"].startswith("python3.11-doc_") and "PSF" in corpus["license"]
    assert corpus["documents"] == 497 and len(corpus["corpus_sha256"]) == 64
    steps = [step for step, _ in record["validation_loss"]]
    assert steps[-1] == record["settings"]["steps"] and record["final_validation_loss"] == record["validation_loss"][-1][1]
    assert "NOT OpenAI's GPT-2" in model.provenance and "Python 3.11 documentation" in model.provenance


@pytest.mark.parametrize("name", ["docs-small", "pydoc-tiny"])
def test_transformers_loads_it_with_equal_logits(name: str) -> None:
    hf = GPT2LMHeadModel.from_pretrained(SHIPPED[name], attn_implementation="eager", torch_dtype=torch.float64).eval()
    ours = GPT.from_pretrained(name, dtype=torch.float64)
    tokens = ours.tokens(DOC_TEXT)
    with torch.no_grad():
        expected = hf(tokens).logits
    assert (ours(tokens) - expected).abs().max() <= 1e-9 * expected.abs().max()


def loss_on(model: GPT, text: str) -> float:
    tokens = model.tokens(text)
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:]).item()


@torch.no_grad()
def test_it_is_trained(record) -> None:
    trained = GPT.from_pretrained("pydoc-tiny")
    untrained = GPT.random(trained.cfg, seed=0)
    assert loss_on(untrained, DOC_TEXT) > 10
    assert loss_on(trained, DOC_TEXT) < 6.5
    assert abs(record["final_validation_loss_as_shipped"] - record["final_validation_loss"]) < 0.02  # bf16 costs ~nothing
    curve = [loss for _, loss in record["validation_loss"]]
    assert curve == sorted(curve, reverse=True) and curve[-1] < math.log(trained.cfg.vocab_size) - 4


# docs-small, the offline default


@pytest.fixture(scope="module")
def docs_record() -> dict:
    return json.loads((SHIPPED["docs-small"] / "TRAINING.json").read_text(encoding="utf-8"))


def test_docs_small_record_describes_the_files_beside_it(docs_record) -> None:
    directory = SHIPPED["docs-small"]
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    assert GPTConfig.from_hf(config) == GPTConfig(**docs_record["config"])
    model = GPT.from_pretrained("docs-small")
    assert sum(p.numel() for p in model.parameters()) == docs_record["parameters"]
    assert (directory / "model.safetensors").stat().st_size <= 26 * 2**20  # about 25 MB in bf16
    import hashlib
    assert hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest() == docs_record["weights_sha256"]
    sources = docs_record["corpus"]["sources"]
    assert [source["name"] for source in sources] == ["Python 3.11 documentation", "Django documentation"]
    assert all(source["license"] and source["package_sha256"] == source["expected_package_sha256"] for source in sources)
    assert docs_record["steps_done"] == docs_record["settings"]["steps"] and docs_record["threads"] >= 1
    assert docs_record["machine"] and docs_record["seconds"] > 0
    assert "NOT OpenAI's GPT-2" in model.provenance and "Django documentation" in model.provenance


@torch.no_grad()
def test_docs_small_beats_counting_on_its_whole_validation_split(docs_record) -> None:
    """At least 0.5 nats below the interpolated bigram on the same windows, every validation window;
    and it copies in context better than it guesses (no head reaches the report's induction score yet)."""
    from probes.induction import induction_scores
    base = docs_record["baselines"]
    loss = docs_record["validation_loss_as_shipped_all_windows"]
    assert docs_record["validation_windows"] * docs_record["settings"]["context"] >= 0.9 * docs_record["corpus"]["val_tokens"]
    assert loss <= base["bigram_interpolated"] - 0.5 and base["bigram_interpolated"] < base["bigram_add_k"]
    assert docs_record["below_interpolated_bigram"] == pytest.approx(base["bigram_interpolated"] - loss, abs=1e-3)
    model = GPT.from_pretrained("docs-small")
    assert loss_on(model, DOC_TEXT) < loss_on(GPT.from_pretrained("pydoc-tiny"), DOC_TEXT)
    found = induction_scores(model, n=20, batch=4, seed=0)
    assert found.induction_loss < found.loss_first.mean().item()


def report_offline(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "minigpt", "report", "Lists are mutable sequences.", "--model",
                           "gpt2", "--out", str(tmp_path / "report"), *extra], capture_output=True, text=True,
                          env=env, timeout=600)
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8") if done.returncode == 0 else ""
    return done, page


@pytest.mark.slow
def test_offline_the_main_job_reports_on_the_shipped_model(tmp_path) -> None:
    done, page = report_offline(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "falling back to docs-small" in done.stderr
    assert "A small model trained by minigpt, not OpenAI's GPT-2" in page and "RANDOM weights" not in page
    payload = json.loads((tmp_path / "report" / "report.json").read_text(encoding="utf-8"))
    assert payload["model"]["random_weights"] is False and payload["model"]["config"]["n_layer"] == 6


@pytest.mark.slow
def test_offline_random_still_gives_random_weights(tmp_path) -> None:
    done, page = report_offline(tmp_path, "--random")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RANDOM weights, not a trained GPT-2" in page and "docs-small" not in page


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch) -> Path:
    """A copy of pydoc-tiny that GPT.from_pretrained("pydoc-tiny") loads instead of the installed one."""
    import shutil

    from minigpt.weights import loading

    copy = Path(shutil.copytree(DIRECTORY, tmp_path / "pydoc-tiny"))
    monkeypatch.setitem(loading.SHIPPED, "pydoc-tiny", copy)
    monkeypatch.chdir(tmp_path.parent)  # no directory named pydoc-tiny here: the name is the shipped model's
    return copy


def test_the_shipped_files_have_the_sha256_recorded_beside_them(shipped_copy) -> None:
    listed = dict(line.split()[::-1] for line in (DIRECTORY / "SHA256SUMS").read_text().splitlines())
    assert set(listed) == {"config.json", "model.safetensors", "TRAINING.json"}
    import hashlib
    assert all(hashlib.sha256((DIRECTORY / name).read_bytes()).hexdigest() == sha for name, sha in listed.items())
    assert GPT.from_pretrained("pydoc-tiny").cfg.n_layer == 8  # the copy, unchanged, loads


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "TRAINING.json"])
def test_a_changed_shipped_file_is_refused(shipped_copy, name) -> None:
    from minigpt import CheckpointError

    data = bytearray((shipped_copy / name).read_bytes())
    data[len(data) // 2] ^= 1
    (shipped_copy / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name} has sha256 .*, not the .* recorded in .*SHA256SUMS: the "
                                              "shipped model's files were changed or damaged; reinstall minigpt"):
        GPT.from_pretrained("pydoc-tiny")


@pytest.mark.parametrize("change", ["missing", "no weights line", "a pipe"])
def test_checksums_that_are_missing_or_incomplete_are_refused(shipped_copy, change) -> None:
    from minigpt import CheckpointError

    sums = shipped_copy / "SHA256SUMS"
    if change == "missing":
        sums.unlink()
    elif change == "no weights line":
        sums.write_text("".join(line + "\n" for line in sums.read_text().splitlines() if "safetensors" not in line))
    else:
        sums.unlink()
        os.mkfifo(sums)  # never opened
    with pytest.raises(CheckpointError, match="SHA256SUMS"):
        GPT.from_pretrained("pydoc-tiny")


def test_the_scripts_write_the_checksums_the_loader_checks(tmp_path) -> None:
    """write_checksums (called by scripts/train_small.py and train_docs.py) gives the shipped SHA256SUMS."""
    import shutil

    from minigpt.weights.loading import write_checksums
    for name in ("config.json", "model.safetensors", "TRAINING.json"):
        shutil.copy(DIRECTORY / name, tmp_path / name)
    write_checksums(tmp_path)
    assert (tmp_path / "SHA256SUMS").read_text() == (DIRECTORY / "SHA256SUMS").read_text()
