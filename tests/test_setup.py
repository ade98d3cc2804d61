"""What an installed minigpt fetches by itself: ``minigpt setup`` stores GPT-2's vocabulary only when its
sha256 is right, from a file, tiktoken's source or PyPI's openai-whisper sdist (the network is faked
here); ``minigpt download`` ends in one error line; ``minigpt --version``; the wheel ships the model."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import pytest

from minigpt import cli, vocabulary
from minigpt.errors import TokenizerError
from minigpt.tokenizer import GPT2_VOCAB_SHA256, gpt2_tokenizer, vocab_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vocab_bytes() -> bytes:
    """The real vocabulary (set-up put it in place before the tests run)."""
    data = vocab_path().read_bytes()
    assert hashlib.sha256(data).hexdigest() == GPT2_VOCAB_SHA256
    return data


@pytest.fixture
def target(monkeypatch, tmp_path) -> Path:
    """An empty place for the vocabulary; the tokenizer rebuilt from the real one afterwards."""
    path = tmp_path / "cache" / "gpt2.tiktoken"
    monkeypatch.setenv("MINIGPT_TOKENIZER_FILE", str(path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    yield path
    gpt2_tokenizer.cache_clear()


def sdist(member: bytes, name: str = "openai_whisper-20250625/" + vocabulary.WHISPER_MEMBER) -> bytes:
    """A .tar.gz holding ``member`` at ``name``, as the openai-whisper sdist holds the vocabulary."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(member)
        tar.addfile(info, io.BytesIO(member))
    return buffer.getvalue()


def fake_network(monkeypatch, archive: bytes, listed_sha256: str | None = None,
                 openai: bytes | None = None) -> list[str]:
    """OpenAI's host (unreachable unless ``openai`` is given), PyPI's simple index and the sdist, served
    from memory; returns the URLs asked for."""
    asked = []
    url = "https://files.example/openai_whisper-20250625.tar.gz"
    index = {"files": [{"filename": vocabulary.WHISPER_SDIST, "url": url,
                        "hashes": {"sha256": listed_sha256 or hashlib.sha256(archive).hexdigest()}}]}

    def get(address, accept=None):
        asked.append(address)
        if address == vocabulary.R50K_URL:
            if openai is None:
                raise urllib.error.URLError("[Errno -2] Name or service not known (test)")
            return openai
        return json.dumps(index).encode() if address == vocabulary.WHISPER_INDEX else archive

    monkeypatch.setattr(vocabulary, "_get", get)
    return asked


def test_setup_from_a_file_and_from_an_sdist(target, vocab_bytes, tmp_path, capsys):
    copy = tmp_path / "r50k_base.tiktoken"
    copy.write_bytes(vocab_bytes)
    assert cli.main(["setup", "--file", str(copy)]) == 0
    assert target.read_bytes() == vocab_bytes and "verified" in capsys.readouterr().out
    assert gpt2_tokenizer().encode("Hello world") == [15496, 995]  # built from the stored copy
    target.unlink()
    archive = tmp_path / vocabulary.WHISPER_SDIST
    archive.write_bytes(sdist(vocab_bytes))
    assert cli.main(["setup", "--file", str(archive)]) == 0
    assert target.read_bytes() == vocab_bytes


def test_setup_refuses_wrong_bytes_and_writes_nothing(target, vocab_bytes, tmp_path, capsys):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(vocab_bytes[:-10])  # one line short
    assert cli.main(["setup", "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not GPT-2's vocabulary" in err and GPT2_VOCAB_SHA256 in err
    assert not target.exists()
    with pytest.raises(TokenizerError, match="holds no whisper/assets/gpt2.tiktoken"):
        bad.write_bytes(sdist(vocab_bytes, name="other/file"))
        vocabulary.setup_vocabulary(bad)
    with pytest.raises(TokenizerError, match="cannot be read"):
        vocabulary.setup_vocabulary(tmp_path / "missing")
    assert not target.exists()


def test_setup_takes_tiktokens_source_when_it_answers(target, vocab_bytes, monkeypatch):
    asked = fake_network(monkeypatch, b"never asked", openai=vocab_bytes)
    vocabulary.setup_vocabulary(say=lambda line: None)
    assert asked == [vocabulary.R50K_URL] and target.read_bytes() == vocab_bytes


def test_setup_offline_takes_the_copy_in_the_whisper_sdist(target, vocab_bytes, monkeypatch):
    asked = fake_network(monkeypatch, sdist(vocab_bytes))
    said = []
    assert vocabulary.setup_vocabulary(say=said.append) == target
    assert target.read_bytes() == vocab_bytes
    assert asked == [vocabulary.R50K_URL, vocabulary.WHISPER_INDEX, "https://files.example/openai_whisper-20250625.tar.gz"]
    assert "tiktoken's source failed (URLError" in said[0] and "on PyPI" in said[-1]
    # Once in place and verified, nothing is fetched again.
    asked.clear()
    vocabulary.setup_vocabulary(say=said.append)
    assert asked == [] and "already in place" in said[-1]
    # A page that is not the vocabulary where OpenAI's file should be (a proxy's): PyPI's copy is taken.
    target.unlink()
    asked = fake_network(monkeypatch, sdist(vocab_bytes), openai=b"<html>log in to the network</html>")
    vocabulary.setup_vocabulary(say=said.append)
    assert len(asked) == 3 and "ValueError" in said[-2] and target.read_bytes() == vocab_bytes


def test_setup_with_no_source_says_how_to_carry_one_in(target, vocab_bytes, monkeypatch):
    fake_network(monkeypatch, sdist(vocab_bytes), listed_sha256="0" * 64)  # a changed download
    with pytest.raises(TokenizerError, match="does not have the sha256 PyPI lists") as info:
        vocabulary.setup_vocabulary(say=lambda line: None)
    assert "minigpt setup --file PATH" in str(info.value) and "pip download" in str(info.value)
    fake_network(monkeypatch, sdist(b"not the vocabulary\n"))  # the archive is PyPI's, its member is not GPT-2's
    with pytest.raises(TokenizerError, match="is not GPT-2's vocabulary"):
        vocabulary.setup_vocabulary(say=lambda line: None)
    assert not target.exists()


def test_download_failure_is_one_error_line(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    def unreachable(repo_id, **kwargs):
        raise ConnectionError("no route to host (test)\nAn error happened while trying to locate the files")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    assert cli.main(["download", "gpt2", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not download 'gpt2'") and "ConnectionError" in err and err.count("\n") == 1


def test_download_checks_what_came(monkeypatch, tmp_path, capsys):
    import huggingface_hub

    from test_report import write_checkpoint

    from minigpt import GPT, GPTConfig

    model = GPT.random(GPTConfig(n_embd=16, n_layer=1, n_head=2, n_positions=16), seed=0)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, local_dir, **kwargs: write_checkpoint(model, Path(local_dir)))
    assert cli.main(["download", "gpt2", str(tmp_path / "ckpt")]) == 0
    assert f"use --model {tmp_path / 'ckpt'}" in capsys.readouterr().out
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, local_dir, **kwargs: local_dir.mkdir())
    assert cli.main(["download", "gpt2", str(tmp_path / "empty")]) == 2  # nothing came: minigpt's own error
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("minigpt-taps 0.1.0") and "source tree" in out  # run from this clone


def test_the_old_script_names_still_work(target, vocab_bytes, tmp_path):
    copy = tmp_path / "gpt2.tiktoken"
    copy.write_bytes(vocab_bytes)
    done = subprocess.run([sys.executable, "scripts/seed_tokenizer.py", "--file", str(copy)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert target.read_bytes() == vocab_bytes


def test_the_wheel_ships_every_package_and_the_shipped_model(tmp_path):
    """A wheel built from the tree holds every package directory of minigpt/ and probes/ (subpackages
    included: a missing one only shows after a plain install) and the shipped model with its checksums."""
    root = Path(__file__).resolve().parent.parent
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(root),
                            "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "setuptools" in built.stderr:
        pytest.skip(f"no setuptools to build with here: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr
    import zipfile

    names = set(zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist())
    packages = {str(p.parent.relative_to(root)) for top in ("minigpt", "probes") for p in (root / top).rglob("__init__.py")}
    for package in packages:
        assert f"{package}/__init__.py" in names, f"{package} is not in the wheel"
    for file in ("config.json", "model.safetensors", "TRAINING.json", "SHA256SUMS"):
        assert f"minigpt/assets/pydoc-tiny/{file}" in names
