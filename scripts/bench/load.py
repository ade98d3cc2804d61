"""Loading a checkpoint: minigpt's ``GPT.from_pretrained`` beside transformers' ``GPT2LMHeadModel.from_pretrained``.

One random-weight checkpoint of GPT-2 medium's shape, written once by transformers' ``save_pretrained``
(safetensors only, no ``pytorch_model.bin``) into a temporary directory. Each measurement is a fresh
process (``harness.in_fresh_process``) that imports its library, then loads the checkpoint and runs
one forward on a few tokens plus a sum over every parameter, so that every weight is read (a model
whose weights are memory-mapped has read nothing yet when ``from_pretrained`` returns). It reports
the time to load, the time to load and run, and the peak memory above what the interpreter held after
its imports (``harness.peak_during``: VmHWM on Linux). Every contender is measured in fp32 and loaded
as bfloat16 (``dtype=torch.bfloat16``) from the same fp32 files. Rounds run the contenders in a
shuffled order; the figures are medians over the rounds after the warm-up ones (which also bring the
files into the page cache, as for every contender alike).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from minigpt import GPTConfig
from minigpt.config import DTYPES, OFFICIAL

from . import harness
from .concern import Concern
from .contenders import QUICK_CONFIG
from .report import mib

LIBRARIES = {"minigpt": "minigpt GPT.from_pretrained", "hf": "transformers GPT2LMHeadModel.from_pretrained"}
LOAD_DTYPES = ("float32", "bfloat16")
TOKENS = 8  # the forward's length: a few tokens read every weight matrix, the sum reads the rest


def write_checkpoint(directory: Path, cfg: GPTConfig, seed: int = 0) -> list[str]:
    """A random-weight GPT2LMHeadModel saved by transformers' save_pretrained (safetensors); the files' names."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**cfg.to_hf()))
    model.save_pretrained(directory, safe_serialization=True)
    files = sorted(p.name for p in directory.iterdir())
    assert not any(name.endswith(".bin") for name in files), files  # the safetensors-only layout
    return files


# ---------------------------------------------------------------------------------------------
# One measurement, in a fresh process


def _import_both():
    """Both loaders, imported (with what they import lazily) before the baseline is taken.

    Both libraries in every process, so that each loader starts from the same interpreter (importing
    transformers brings in much of torch, torch._dynamo among it, that a loader might otherwise
    import lazily and be charged for).
    """
    import safetensors.torch  # noqa: F401  (minigpt.weights imports it on first use)
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from minigpt import GPT

    hf_logging.disable_progress_bar()
    return {"minigpt": GPT.from_pretrained, "hf": GPT2LMHeadModel.from_pretrained}


def child(request: dict) -> dict:
    """Load the checkpoint with one library, run one forward that reads every weight; times and peak memory."""
    torch.set_num_threads(request["threads"] or torch.get_num_threads())
    from_pretrained = _import_both()[request["library"]]
    device, dtype = request["device"], DTYPES[request["dtype"]]
    tokens = torch.randint(0, request["vocab_size"], (1, TOKENS), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    times: dict[str, float] = {}

    def load_and_run() -> tuple[torch.nn.Module, torch.Tensor, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        if request["library"] == "minigpt":
            model = from_pretrained(request["checkpoint"], dtype=dtype, device=device)
        else:
            # HF puts the weights on a GPU while loading when given a device_map; on CPU it has none to do.
            model = from_pretrained(request["checkpoint"], dtype=dtype, device_map=None if device == "cpu" else device)
        harness.sync(device)
        times["load_s"] = time.perf_counter() - start
        with torch.no_grad():
            logits = model(tokens)
            logits = logits if isinstance(logits, torch.Tensor) else logits.logits
            checksum = sum(float(p.sum()) for p in model.parameters())  # reads every weight, no temporaries
        harness.sync(device)
        times["load_and_forward_s"] = wall = time.perf_counter() - start
        # As in harness.time_round_robin: the share of the wall time our threads ran tells a quiet run
        # from one that other processes slowed down; major page faults are pages read from the disk.
        times["cpu_share"] = (time.process_time() - start_cpu) / (wall * torch.get_num_threads())
        times["major_page_faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults
        return model, logits[0, -1, :8].float().cpu(), checksum

    (model, logits, checksum), memory = harness.peak_during(load_and_run, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {**times, **memory, "weight_bytes": weight_bytes, "logits": logits.tolist(), "checksum": checksum}


# ---------------------------------------------------------------------------------------------
# The rounds


def run(args: argparse.Namespace, log=print) -> dict:
    cfg = QUICK_CONFIG if args.quick else OFFICIAL["gpt2-medium"]
    rounds, warmup = (2, 0) if args.quick else (args.load_rounds, 1)
    names = [f"{library}_{dtype}" for dtype in LOAD_DTYPES for library in LIBRARIES]
    measured: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="minigpt-load-bench-") as directory:
        log(f"load: writing a random {'tiny' if args.quick else 'GPT-2 medium'} checkpoint with save_pretrained")
        files = write_checkpoint(Path(directory), cfg)
        for round_, order in enumerate(harness.shuffled_rounds(names, warmup + rounds, seed=1)):
            log(f"  load round {round_ + 1}" + (" (warm-up)" if round_ < warmup else "") + ": " + ", ".join(order))
            for name in order:
                library, dtype = name.split("_")
                answer = harness.in_fresh_process("load", {
                    "library": library, "dtype": dtype, "checkpoint": directory, "device": args.device,
                    "threads": args.threads or 0, "vocab_size": cfg.vocab_size})
                if "error" in answer:
                    raise RuntimeError(f"load bench, {name}: {answer['error']}")
                if round_ >= warmup:
                    measured[name].append(answer)
    rows = [_row(name, measured[name]) for name in names]
    _compare(rows)
    return {"model": "quick tiny config" if args.quick else "GPT-2 medium shape (355M), random weights",
            "config": cfg.to_hf(), "files": files, "rounds": rounds, "warmup_rounds": warmup, "tokens": TOKENS,
            "rows": rows, "target_values": {f"load.{r['dtype']}.{key}": r[key] for r in rows if r["library"] == "minigpt"
                                            for key in ("peak_over_weights", "time_vs_hf")}}


def _row(name: str, answers: list[dict]) -> dict:
    library, dtype = name.split("_")
    median = lambda key: statistics.median(a[key] for a in answers)  # noqa: E731
    weight_bytes = answers[0]["weight_bytes"]
    timings = harness.Timings([a["load_and_forward_s"] for a in answers], [a["cpu_share"] for a in answers])
    return {"name": name, "label": f"{LIBRARIES[library]}, {'fp32' if dtype == 'float32' else 'as bf16'}",
            "library": library, "dtype": dtype, "load_s": median("load_s"),
            "load_and_forward_s": timings.headline(), "load_and_forward_quiet_s": timings.quiet_median(),
            "quiet_rounds": len(timings.quiet()), "peak_extra_bytes": int(median("peak_extra_bytes")),
            "weight_bytes": weight_bytes, "peak_over_weights": median("peak_extra_bytes") / weight_bytes,
            "load_times_s": [a["load_s"] for a in answers],
            "load_and_forward_times_s": timings.seconds, "cpu_shares": timings.shares,
            "major_page_faults": [a["major_page_faults"] for a in answers],
            "peaks_bytes": [a["peak_extra_bytes"] for a in answers], "memory_method": answers[0]["memory_method"],
            "logits": answers[0]["logits"], "checksum": answers[0]["checksum"]}


def _compare(rows: list[dict]) -> None:
    """Each row's times over HF's in the same dtype, and how far its logits are from HF's."""
    hf = {r["dtype"]: r for r in rows if r["library"] == "hf"}
    for r in rows:
        theirs = hf[r["dtype"]]
        r["time_vs_hf"] = r["load_and_forward_s"] / theirs["load_and_forward_s"]
        r["quiet_time_vs_hf"] = r["load_and_forward_quiet_s"] / theirs["load_and_forward_quiet_s"]
        r["load_only_vs_hf"] = r["load_s"] / theirs["load_s"]
        r["max_abs_logit_diff_vs_hf"] = max(abs(a - b) for a, b in zip(r["logits"], theirs["logits"]))


def markdown(section: dict) -> str:
    lines = [f"{section['model']}, files {', '.join(section['files'])}; each measurement a fresh process: load, "
             f"then one forward of {section['tokens']} tokens and a sum over every parameter. "
             f"{section['rounds']} rounds in shuffled order after {section['warmup_rounds']} warm-up round(s); medians.",
             "",
             "| contender | load ms | load + forward ms | x HF (load + forward) | x HF (load only) "
             "| load + forward ms, quiet rounds | x HF, quiet rounds | quiet rounds | peak MiB "
             "| weights MiB | peak / weights | max abs logit diff vs HF |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in section["rows"]:
        lines.append(f"| {r['label']} | {r['load_s'] * 1e3:,.0f} | {r['load_and_forward_s'] * 1e3:,.0f} "
                     f"| {r['time_vs_hf']:.2f} | {r['load_only_vs_hf']:.2f} | {r['load_and_forward_quiet_s'] * 1e3:,.0f} "
                     f"| {r['quiet_time_vs_hf']:.2f} | {r['quiet_rounds']}/{len(r['load_times_s'])} "
                     f"| {mib(r['peak_extra_bytes'])} "
                     f"| {mib(r['weight_bytes'])} | {r['peak_over_weights']:.2f} | {r['max_abs_logit_diff_vs_hf']:.1e} |")
    lines += ["", "Medians over all rounds (the targets use them); quiet rounds: those in which the process's threads "
              f"ran at least {harness.QUIET_SHARE:.0%} of the CPU share of that contender's best round, as in the "
              "forward table. Peak = the highest resident set during load + forward above the interpreter's after "
              "its imports (file pages mapped in count); weights = the parameters' bytes in the loaded dtype."]
    return "\n".join(lines)


CONCERN = Concern("load", "loading a GPT-2-medium-shaped checkpoint: peak memory over the weights, time vs HF",
                  default=True, run=run, markdown=markdown, child=child)
