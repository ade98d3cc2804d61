#!/usr/bin/env python
"""Make docs-small, a small GPT-2 trained from scratch on the Python and Django documentation, offline.

    .venv/bin/python scripts/train_docs.py --out DIR            # fetch the corpora, train, export to DIR
    .venv/bin/python scripts/train_docs.py --sweep              # the short runs of docs/SWEEP.md
    .venv/bin/python scripts/train_docs.py --out DIR --export-only   # export a run stopped early, as it is
    .venv/bin/python scripts/train_docs.py --out DIR --measure-only  # measure DIR's model again into its record

The shipped minigpt/assets/docs-small is this script's defaults (docs/SWEEP.md has the run and the
sweep that chose its settings).

The corpus, two documentation sets fetched from package registries and nothing else:

* the Python 3.11 documentation's reStructuredText sources, from Debian's python3.11-doc (as
  scripts/train_small.py takes them; PSF License Agreement, Python Software Foundation License Version 2);
* Django's documentation, ``docs/**/*.txt`` of Django's source distribution on PyPI
  (``pip download --no-deps --no-binary :all: django==5.1.4``; BSD-3-Clause: Django's LICENSE,
  which covers the whole source tree, its docs/ included).

Each line is stripped of its indentation (scripts/train_small.py: ``flatten``). Each file is one
document; 2% of them (seeded) are held out for validation. ``--repeat F`` trains with a fraction F of
the windows repeating a prefix (minigpt/training/data.py), the runs of docs/SWEEP.md that tried to
make induction heads form; docs-small itself was trained without. The shape and the settings below were
chosen by the short runs of ``--sweep`` (docs/SWEEP.md). TRAINING.json records, beside the loss
curve: the validation loss of the weights as shipped on every validation window, the uniform /
unigram / bigram baselines on those same windows (minigpt/training/baselines.py), the induction
score of each head, the weights' sha256, the machine, the threads, the wall time and the load.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt import GPT, GPTConfig, TrainingError  # noqa: E402
from minigpt.files import file_sha256, read_json, write_json  # noqa: E402
from minigpt.training import Settings, checkpoint, evaluate, train  # noqa: E402
from minigpt.training.baselines import baselines  # noqa: E402
from minigpt.training.data import Windows  # noqa: E402
from minigpt.weights.loading import write_checksums  # noqa: E402
from probes.induction import induction_scores  # noqa: E402
from scripts.train_small import PACKAGE, PACKAGE_SHA256, corpus_sha256, extract_sources, fetch_package  # noqa: E402
from scripts.train_small import flatten  # noqa: E402

NAME = "docs-small"
DJANGO_VERSION = "5.1.4"
DJANGO_SHA256 = "de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a"
SHIPPED = ROOT / "minigpt" / "assets" / NAME
CONFIG = GPTConfig(n_embd=192, n_layer=6, n_head=6, n_positions=256, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
SETTINGS = Settings(steps=3600, batch_size=8, grad_accum=1, context=256, lr=2e-3, min_lr=2e-4, warmup=200,
                    weight_decay=0.1, grad_clip=1.0, dropout=0.0, val_fraction=0.02, eval_every=400,
                    eval_windows=64, seed=0, precision="bf16")


def fetch_django(directory: Path) -> Path:
    """``pip download`` Django's source distribution into ``directory`` (PyPI only)."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                           f"django=={DJANGO_VERSION}", "-d", str(directory)], capture_output=True, text=True)
    found = sorted(directory.glob(f"[Dd]jango-{DJANGO_VERSION}.tar.gz"))
    if done.returncode or not found:
        raise SystemExit(f"error: pip download django=={DJANGO_VERSION} failed: {done.stderr.strip()[-400:]}; "
                         "pass --django with the sdist")
    return found[0]


def extract_django(sdist: Path, corpus: Path) -> list[Path]:
    """Django's documentation (``docs/**/*.txt`` of the sdist), each file flattened, under ``corpus``."""
    written = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 2)
            if member.isfile() and len(parts) == 3 and parts[1] == "docs" and parts[2].endswith(".txt"):
                target = corpus / parts[2]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(flatten(tar.extractfile(member).read().decode("utf-8")), encoding="utf-8")
                written.append(target)
    return sorted(written)


def build_corpus(args: argparse.Namespace, corpus: Path) -> dict:
    """Both documentation sets flattened under ``corpus``/{python,django}; returns their provenance."""
    shutil.rmtree(corpus, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        deb = args.deb or fetch_package(Path(tmp))
        sdist = args.django or fetch_django(Path(tmp))
        python_files = extract_sources(deb, corpus / "python")
        django_files = extract_django(sdist, corpus / "django")
        sources = [
            {"name": "Python 3.11 documentation", "package": deb.name, "registry": f"Debian (bookworm): apt-get download {PACKAGE}",
             "package_sha256": file_sha256(deb), "expected_package_sha256": PACKAGE_SHA256,
             "files": "/usr/share/doc/python3.11/html/_sources/**/*.rst.txt", "documents": len(python_files),
             "license": "PSF License Agreement (Python Software Foundation License Version 2)"},
            {"name": "Django documentation", "package": sdist.name,
             "registry": f"PyPI: pip download --no-deps --no-binary :all: django=={DJANGO_VERSION}",
             "package_sha256": file_sha256(sdist), "expected_package_sha256": DJANGO_SHA256,
             "files": "docs/**/*.txt", "documents": len(django_files),
             "license": "BSD-3-Clause (Django's LICENSE, covering the sdist's docs/)"},
        ]
    for source in sources:
        if source["package_sha256"] != source["expected_package_sha256"]:
            print(f"warning: {source['package']} differs from the one docs-small was trained on: the model made "
                  "will differ too", file=sys.stderr)
    files = python_files + django_files
    return {"sources": sources, "documents": len(files), "corpus_sha256": corpus_sha256(files, corpus),
            "preprocessing": "each line stripped of leading and trailing whitespace; runs of blank lines made one "
                             "(scripts/train_small.py: flatten)"}


# The short runs of docs/SWEEP.md: each sees the same tokens (SWEEP_STEPS * 2048) and is scored on
# the same 16,384 validation tokens (SWEEP_VAL_TOKENS / context windows).
SWEEP_STEPS, SWEEP_VAL_TOKENS = 48, 16384
SWEEP_SETTINGS = {"steps": SWEEP_STEPS, "warmup": 10, "min_lr": 3e-4, "eval_every": SWEEP_STEPS, "batch_size": 8, "val_fraction": 0.05}
SWEEP = {
    "d64-L8-lr3e-3": (replace(CONFIG, n_embd=64, n_layer=8, n_head=4), {"lr": 3e-3}),
    "d128-L6-lr3e-3": (replace(CONFIG, n_embd=128, n_head=4), {"lr": 3e-3}),
    "d128-L6-lr1e-3": (replace(CONFIG, n_embd=128, n_head=4), {"lr": 1e-3}),
    "d192-L6-lr2e-3": (CONFIG, {"lr": 2e-3}),
    "d128-L6-ctx128-lr3e-3": (replace(CONFIG, n_embd=128, n_head=4), {"lr": 3e-3, "context": 128, "batch_size": 16}),
}


def sweep(corpus: Path, work: Path, threads: int) -> dict:
    """Each SWEEP entry trained SWEEP_STEPS steps -> {name: {val_loss, seconds, ...}}, also in work/sweep.json."""
    results = read_json(work / "sweep.json", TrainingError, "remove it") if (work / "sweep.json").exists() else {}
    for name, (config, changes) in SWEEP.items():
        if name in results:
            continue
        context = changes.get("context", SETTINGS.context)
        settings = replace(SETTINGS, **{**SWEEP_SETTINGS, "eval_windows": SWEEP_VAL_TOKENS // context, **changes})
        started = time.perf_counter()
        state = train([corpus], config, work / "sweep" / name, settings, save_every=SWEEP_STEPS, quiet=True)
        results[name] = {"config": {k: getattr(config, k) for k in ("n_embd", "n_layer", "n_head")},
                         "settings": {k: getattr(settings, k) for k in ("lr", "context", "batch_size", "steps")},
                         "val_loss": round(state["log"][-1]["val_loss"], 4),
                         "train_loss_last_10": round(sum(e["loss"] for e in state["log"][-10:]) / 10, 4),
                         "seconds": round(time.perf_counter() - started, 1), "threads": threads, "load": load()}
        print(name, results[name], file=sys.stderr, flush=True)
        write_json(work / "sweep.json", results)
    return results


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages (other jobs share the cores)."""
    return [round(x, 2) for x in os.getloadavg()]


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``every`` seconds while the run lasts (other jobs share the cores)."""

    def __init__(self, every: float = 60.0):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.samples.append(load()[0])

    def summary(self) -> dict:
        self.stop.set()
        found = self.samples or [load()[0]]
        return {"load_1min_mean": round(sum(found) / len(found), 2), "load_1min_max": max(found),
                "load_samples": len(self.samples)}


def machine() -> str:
    """The CPU's model name (/proc/cpuinfo) and its core count."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def measure(out: Path, run: Path, settings: Settings) -> dict:
    """The shipped (bf16) weights on every validation window, the baselines on those windows, the induction heads."""
    model = GPT.from_pretrained(out)
    windows = Windows.open(run / "data", "val", settings.context)
    every = replace(settings, eval_windows=len(windows), batch_size=16, precision="fp32")  # as it is used: float32
    loss = evaluate(model, windows, every, 0, 1)
    train_tokens = Windows.open(run / "data", "train", settings.context).tokens
    base = baselines(train_tokens, windows, model.cfg.vocab_size)
    found = induction_scores(model, n=50, batch=8, seed=0)
    return {"validation_loss_as_shipped_all_windows": round(loss, 4), "validation_windows": len(windows),
            "baselines": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in base.items()},
            "below_interpolated_bigram": round(base["bigram_interpolated"] - loss, 4),
            "induction": {"method": "probes.induction.induction_scores(model, n=50, batch=8, seed=0): 8 rows of 50 "
                                    "distinct random tokens written twice; mean attention from each second-copy token "
                                    "to the token after its first occurrence", "top_heads": top_heads(found.scores),
                          "uniform_attention_score": round(found.chance, 4),
                          "loss_first_half": round(found.loss_first.mean().item(), 4),
                          "loss_repeat": round(found.induction_loss, 4),
                          "per_head": [[round(float(x), 4) for x in row] for row in found.scores]}}


def top_heads(scores: torch.Tensor, count: int = 5) -> list[dict]:
    """The ``count`` best heads of scores [n_layer, n_head] -> [{"head": "L.H", "score"}, ...], best first."""
    n_head = scores.shape[1]
    return [{"head": f"{int(i) // n_head}.{int(i) % n_head}", "score": round(float(scores.flatten()[i]), 4)}
            for i in scores.flatten().argsort(descending=True)[:count]]


def record(args: argparse.Namespace, provenance: dict, state: dict, settings: Settings, timing: dict) -> dict:
    """TRAINING.json's contents."""
    run = args.work / "run"
    data = read_json(run / "data" / "data.json", TrainingError, "train again")
    validation = [(e["step"], round(e["val_loss"], 4)) for e in state["log"] if "val_loss" in e]
    model = GPT.from_pretrained(args.out)
    return {
        "name": NAME,
        "what": "a small GPT-2 trained from scratch by minigpt on the Python and Django documentation; NOT OpenAI's GPT-2",
        "corpus": {**provenance, "train_tokens": data["train_tokens"], "val_tokens": data["val_tokens"],
                   "split": data["split"]},
        "config": asdict(CONFIG), "parameters": sum(t.numel() for t in model.state_dict().values()),
        "settings": asdict(settings), "stored_dtype": "bfloat16",
        "weights_sha256": file_sha256(args.out / "model.safetensors"),
        "steps_done": state["step"], "tokens_seen": state["step"] * settings.global_batch(1) * settings.context,
        "validation_loss": validation, "final_validation_loss": validation[-1][1],
        **measure(args.out, run, settings),
        "train_loss_last_50_steps": round(sum(e["loss"] for e in state["log"][-50:]) / len(state["log"][-50:]), 4),
        **timing, "threads": args.threads, "machine": machine(),
        "torch": torch.__version__, "made_by": "scripts/train_docs.py", "sweep": "docs/SWEEP.md",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help=f"where the bf16 model goes (required unless --sweep; {SHIPPED} "
                                            "to remake the shipped one)")
    p.add_argument("--sweep", action="store_true", help="run the short runs of docs/SWEEP.md instead")
    p.add_argument("--export-only", action="store_true",
                   help="export the last checkpoint of --work/run as it is, without training (a run stopped early)")
    p.add_argument("--measure-only", action="store_true",
                   help="measure the model in --out again (loss, baselines, induction) and update its TRAINING.json")
    p.add_argument("--deb", type=Path, default=None, help=f"a {PACKAGE} .deb (default: apt-get download it)")
    p.add_argument("--django", type=Path, default=None, help=f"Django-{DJANGO_VERSION}.tar.gz (default: pip download it)")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "train-docs", help="corpus and checkpoints")
    p.add_argument("--steps", type=int, default=SETTINGS.steps)
    p.add_argument("--repeat", type=float, default=SETTINGS.repeat,
                   help="fraction of the training windows that repeat a prefix (docs/SWEEP.md; default: none)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not args.sweep and args.out is None:
        p.error("give --out DIR (the shipped model is remade only when asked: --out minigpt/assets/docs-small)")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.measure_only:
        kept = read_json(args.out / "TRAINING.json", TrainingError, "export it first")
        settings = Settings(**kept["settings"])
        write_json(args.out / "TRAINING.json", {**kept, **measure(args.out, args.work / "run", settings),
                                                "weights_sha256": file_sha256(args.out / "model.safetensors")})
        write_checksums(args.out)
        return
    if args.export_only:
        state = checkpoint.load_state(args.work / "run")
        if state is None:
            p.error(f"{args.work / 'run'} holds no checkpoint")
        per_step = [SETTINGS.global_batch(1) * SETTINGS.context / e["tokens_per_s"] for e in state["log"]]
        provenance = read_json(args.work / "provenance.json", TrainingError, "train again")
        export(args, provenance, state, replace(SETTINGS, steps=args.steps, repeat=args.repeat),
               {"seconds": round(sum(per_step), 1), "seconds_counted": "the steps' own times (the run was stopped)"})
        return
    provenance = build_corpus(args, args.work / "corpus")
    write_json(args.work / "provenance.json", provenance)
    if args.sweep:
        sweep(args.work / "corpus", args.work, args.threads)
        return
    settings = replace(SETTINGS, steps=args.steps, repeat=args.repeat)
    load_before, sampler, started = load(), LoadSampler(), time.perf_counter()
    sampler.start()
    state = train([args.work / "corpus"], CONFIG, args.work / "run", settings, save_every=100)
    export(args, provenance, state, settings, {"seconds": round(time.perf_counter() - started, 1),
                                               "load_before": load_before, "load_after": load(), **sampler.summary()})


def export(args: argparse.Namespace, provenance: dict, state: dict, settings: Settings, timing: dict) -> None:
    """The checkpoint of --work/run in bf16 to --out, with its TRAINING.json."""
    GPT.from_pretrained(args.work / "run").save_pretrained(args.out, dtype=torch.bfloat16)
    write_json(args.out / "TRAINING.json", record(args, provenance, state, settings, timing))
    write_checksums(args.out)  # what the loader checks on every load of a shipped model
    print(f"done in {timing['seconds'] / 60:.1f} min; the model is in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
