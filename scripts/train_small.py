#!/usr/bin/env python
"""Make the small trained GPT-2 that ships with minigpt (minigpt/assets/pydoc-tiny), from scratch, offline.

    .venv/bin/python scripts/train_small.py                 # fetch the corpus with apt-get, train, export to build/
    .venv/bin/python scripts/train_small.py --deb FILE.deb  # a python3.11-doc package you already have
    .venv/bin/python scripts/train_small.py --out minigpt/assets/pydoc-tiny   # remake the shipped model itself

The corpus: the reStructuredText sources of the Python 3.11 documentation (tutorial, library and
language reference, HOWTOs, FAQ, what's new), as Debian ships them in the package python3.11-doc
(html/_sources/**/*.rst.txt, 497 files, about 11 MB); English prose with code examples. Each line
is stripped of its indentation (see ``flatten``: GPT-2's BPE spends a token per space of it). License: the Python documentation is under the PSF License Agreement (Python Software
Foundation License Version 2); see the package's /usr/share/doc/python3.11-doc/copyright. Each
file is one document; 5% of them (seeded) are held out for the validation loss.

The model: 8 blocks, d_model 64, 4 heads, 256 positions, GPT-2's vocabulary (3.6 M parameters, of
which 3.2 M are the token embedding); trained with ``minigpt train`` (the settings below) on two CPU
cores in about 15 minutes; exported in bfloat16 (7 MB) with TRAINING.json beside it: the corpus's
provenance and hashes, the settings, the loss curve, the time taken and the machine.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt import GPT, GPTConfig, TrainingError  # noqa: E402
from minigpt.files import read_json, write_json  # noqa: E402
from minigpt.training import Settings, train  # noqa: E402
from minigpt.weights.loading import write_checksums  # noqa: E402

PACKAGE, VERSION = "python3.11-doc", "3.11.2-6+deb12u9"
PACKAGE_SHA256 = "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be"
CORPUS_SHA256 = "f7909160d7027431183799c3dec489ba5fd2c220cbabce991c401443383e1e75"  # the flattened sources pydoc-tiny was trained on
SOURCES = "./usr/share/doc/python3.11/html/_sources/"
CONFIG = GPTConfig(n_embd=64, n_layer=8, n_head=4, n_positions=256, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
SETTINGS = Settings(steps=700, batch_size=8, grad_accum=1, context=256, lr=3e-3, min_lr=3e-4, warmup=50,
                    weight_decay=0.1, grad_clip=1.0, dropout=0.0, val_fraction=0.05, eval_every=100,
                    eval_windows=128, seed=0)
SHIPPED = ROOT / "minigpt" / "assets" / "pydoc-tiny"


def fetch_package(directory: Path) -> Path:
    """``apt-get download`` the documentation package into ``directory`` (Debian's registry only)."""
    for version in (VERSION, None):  # the pinned version, else whatever Debian serves now (hashes recorded)
        spec = f"{PACKAGE}={version}" if version else PACKAGE
        done = subprocess.run(["apt-get", "download", spec], cwd=directory, capture_output=True, text=True)
        found = sorted(directory.glob(f"{PACKAGE}_*.deb"))
        if done.returncode == 0 and found:
            return found[-1]
    raise SystemExit(f"error: apt-get download {PACKAGE} failed: {done.stderr.strip()}; run 'apt-get update' "
                     "first, or pass --deb with the package file")


def extract_sources(deb: Path, corpus: Path) -> list[Path]:
    """The .rst.txt sources out of a .deb (an ar archive holding data.tar.xz), without dpkg."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise SystemExit(f"error: {deb} is not a Debian package")
    offset, data = 8, None
    while offset < len(blob):
        name, size = blob[offset:offset + 16].decode().strip(), int(blob[offset + 48:offset + 58].decode())
        if name.rstrip("/").startswith("data.tar"):
            data = blob[offset + 60:offset + 60 + size]
        offset += 60 + size + (size % 2)
    if data is None:
        raise SystemExit(f"error: {deb} holds no data.tar")
    written = []
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(data) if data[:6] == b"\xfd7zXZ\x00" else data)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.startswith(SOURCES) and member.name.endswith(".rst.txt"):
                target = corpus / member.name[len(SOURCES):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(flatten(tar.extractfile(member).read().decode("utf-8")), encoding="utf-8")
                written.append(target)
    return sorted(written)


def flatten(text: str) -> str:
    """Each line without its leading and trailing whitespace, runs of blank lines as one.

    GPT-2's BPE spends a token per space of indentation (reStructuredText indents code samples and
    directive bodies), so left as it is the corpus is largely spaces, and so would be what the model
    learns to write.
    """
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for i, line in enumerate(lines) if line or (i > 0 and lines[i - 1])]
    return "\n".join(kept).strip() + "\n"


def corpus_sha256(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def validation_loss_as_shipped(shipped: Path, run: Path, settings: Settings) -> float:
    """The validation loss of the bf16 weights as they ship (loaded as float32, as by default), on the
    windows the training run evaluated."""
    from minigpt.training import evaluate
    from minigpt.training.data import Windows

    model = GPT.from_pretrained(shipped)
    return evaluate(model, Windows.open(run / "data", "val", settings.context), settings, 0, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deb", type=Path, default=None, help=f"a {PACKAGE} .deb (default: apt-get download it)")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "train-small", help="corpus and checkpoints")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "train-small" / "model",
                   help=f"where the bf16 model goes (default: build/train-small/model; {SHIPPED} only when asked)")
    p.add_argument("--steps", type=int, default=SETTINGS.steps)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb or fetch_package(Path(tmp))
        package_sha256 = hashlib.sha256(deb.read_bytes()).hexdigest()
        corpus = args.work / "corpus"
        files = extract_sources(deb, corpus)
    print(f"corpus: {len(files)} files from {deb.name} (sha256 {package_sha256[:12]}...)", file=sys.stderr)
    if corpus_sha256(files, corpus) != CORPUS_SHA256:
        print(f"warning: this corpus differs from the one the shipped model was trained on (package "
              f"{PACKAGE}={VERSION}, sha256 {PACKAGE_SHA256[:12]}...): the model made will differ too", file=sys.stderr)
    settings = Settings(**{**asdict(SETTINGS), "steps": args.steps})
    started = time.perf_counter()
    state = train([corpus], CONFIG, args.work / "run", settings, save_every=100)
    seconds = time.perf_counter() - started

    model = GPT.from_pretrained(args.work / "run")
    model.save_pretrained(args.out, dtype=torch.bfloat16)
    shipped_loss = validation_loss_as_shipped(args.out, args.work / "run", settings)
    data = read_json(args.work / "run" / "data" / "data.json", TrainingError, "train again")
    validation = [(e["step"], round(e["val_loss"], 4)) for e in state["log"] if "val_loss" in e]
    record = {
        "name": "pydoc-tiny",
        "what": "a small GPT-2 trained from scratch by minigpt on the Python 3.11 documentation; NOT OpenAI's GPT-2",
        "corpus": {"package": deb.name, "package_sha256": package_sha256, "expected_package_sha256": PACKAGE_SHA256,
                   "registry": "Debian (bookworm), apt-get download " + PACKAGE,
                   "files": f"{SOURCES.lstrip('.')}**/*.rst.txt", "documents": len(files),
                   "preprocessing": "each line stripped of leading and trailing whitespace; runs of blank lines "
                                    "made one (scripts/train_small.py: flatten)",
                   "corpus_sha256": corpus_sha256(files, corpus),
                   "license": "PSF License Agreement (Python Software Foundation License Version 2)",
                   "train_tokens": data["train_tokens"], "val_tokens": data["val_tokens"], "split": data["split"]},
        "config": asdict(CONFIG), "parameters": sum(t.numel() for t in model.state_dict().values()),
        "settings": asdict(settings), "stored_dtype": "bfloat16",
        "tokens_seen": settings.steps * settings.global_batch(1) * settings.context,
        "validation_loss": validation, "final_validation_loss": validation[-1][1],
        "final_validation_loss_as_shipped": round(shipped_loss, 4),
        "train_loss_last_50_steps": round(sum(e["loss"] for e in state["log"][-50:]) / 50, 4),
        "seconds": round(seconds, 1), "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "made_by": "scripts/train_small.py",
    }
    write_json(args.out / "TRAINING.json", record)
    write_checksums(args.out)  # what the loader checks on every load of a shipped model
    print(f"validation loss {validation[-1][1]} after {settings.steps} steps ({seconds / 60:.1f} min); "
          f"the model is in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
