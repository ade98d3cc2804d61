"""How things are measured: timing in alternation, peak memory, work in a fresh process, the machine.

Timing: every round calls each contender once, in an order shuffled anew each round (a seeded
shuffle, so runs repeat), after warm-up rounds; the headline is the median over all measured
calls. Memory: the peak above what was live before (CPU: the resident set's high-water mark,
Linux VmHWM; GPU: torch.cuda.max_memory_allocated), best taken in a fresh process
(``in_fresh_process``) so that nothing else shares the heap.
"""
from __future__ import annotations

import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository root, from where `python -m scripts.bench` runs
T = TypeVar("T")


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Timing


def shuffled_rounds(names: list[str], rounds: int, seed: int = 0) -> Iterator[list[str]]:
    """``rounds`` orders of ``names``, each shuffled anew: no contender always runs first or after another."""
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        yield order


QUIET_SHARE = 0.9  # a CPU call is "quiet" if its threads ran at least this share of its best call's


@dataclass
class Timings:
    """Wall seconds of each measured call, and on CPU the share of it this process's threads ran."""
    seconds: list[float]
    shares: list[float | None]

    def quiet(self) -> list[float]:
        """Calls no other process disturbed (all calls on a GPU, where the share is not measured)."""
        best = max((s for s in self.shares if s is not None), default=None)
        return [t for t, s in zip(self.seconds, self.shares) if s is None or s >= QUIET_SHARE * best]

    def headline(self) -> float:
        """The median over all measured calls."""
        return statistics.median(self.seconds)

    def quiet_median(self) -> float:
        """Median of the quiet calls; of all calls if fewer than 3 were quiet."""
        quiet = self.quiet()
        return statistics.median(quiet if len(quiet) >= 3 else self.seconds)


def time_round_robin(calls: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int,
                     threads: int, log=print, seed: int = 0,
                     before_each: Callable[[], None] | None = None) -> dict[str, Timings]:
    """Time each entry: every round calls each once, in a shuffled order; warm-up rounds are dropped.

    On a shared machine other processes take cores away in bursts. On CPU each call's process time
    over (wall time x threads) says how much of the call our threads actually ran (about 1 for a
    quiet call whose work is spread over all threads); a call whose share is below QUIET_SHARE times
    the best share among that entry's calls was disturbed. Up to ``repeats // 2`` extra rounds run
    while some entry has fewer than ``repeats // 2`` (at least 3) quiet calls. ``before_each()`` runs
    before every call, untimed (e.g. ``os.sync``: no call pays for the disk writes another left behind).
    """
    timings = {name: Timings([], []) for name in calls}
    cpu = not str(device).startswith("cuda")
    enough = min(repeats, max(3, repeats // 2))
    most = warmup + repeats + repeats // 2
    for round_, order in enumerate(shuffled_rounds(list(calls), most, seed)):
        if round_ >= warmup + repeats and min(len(t.quiet()) for t in timings.values()) >= enough:
            break
        for name in order:
            if before_each is not None:
                before_each()
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            result = calls[name]()
            sync(device)
            elapsed, used = time.perf_counter() - start, time.process_time() - start_cpu
            del result  # freed before the next contender runs
            if round_ >= warmup:
                timings[name].seconds.append(elapsed)
                timings[name].shares.append(used / (elapsed * threads) if cpu else None)
        quiet = min(len(t.quiet()) for t in timings.values())
        log(f"  round {round_ + 1}" + (" (warm-up)" if round_ < warmup else f", fewest quiet calls: {quiet}"))
    return timings


# ---------------------------------------------------------------------------------------------
# Memory


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), e.g. VmRSS or VmHWM, in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux); False where that cannot be done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_fallback() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        return 0


def peak_during(work: Callable[[], T], device: str) -> tuple[T, dict]:
    """Run ``work()``; its result and the peak memory it added above what was live before it.

    Returns ``{"peak_extra_bytes", "held_after_bytes", "memory_method"}``. CPU: the resident set's
    high-water mark (Linux VmHWM, reset just before). Run it in a fresh process with glibc told to
    return freed memory at once (``in_fresh_process`` does), else the figure understates.
    GPU: torch.cuda.max_memory_allocated.
    """
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = work()
        torch.cuda.synchronize()
        peak, held = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
        method = "torch.cuda.max_memory_allocated"
    elif reset_peak():
        base = status_bytes("VmRSS")
        reset_peak()
        result = work()
        peak, held = status_bytes("VmHWM") - base, status_bytes("VmRSS") - base
        method = "VmHWM - VmRSS before (Linux)"
    else:  # e.g. macOS: ru_maxrss never goes down, so this is only right if the work sets a new peak
        base = _rss_fallback()
        result = work()
        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - base
        held, method = _rss_fallback() - base, "ru_maxrss (approximate)"
    return result, {"peak_extra_bytes": int(peak), "held_after_bytes": int(held), "memory_method": method}


def unique_bytes(tensors: list[torch.Tensor], leave_out: torch.Tensor | None = None) -> int:
    """Bytes of the storages behind ``tensors``, each counted once (views share their base's storage).

    ``leave_out``: a tensor whose storage is not counted (the logits, which every call returns anyway).
    """
    def key(t):
        s = t.untyped_storage()
        return s.device, s.data_ptr()

    storages = {key(t): t.untyped_storage().nbytes() for t in tensors}
    if leave_out is not None:
        storages.pop(key(leave_out), None)
    return sum(storages.values())


# glibc otherwise keeps freed large blocks (its mmap threshold adapts upward), hiding real peaks.
FRESH_PROCESS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "PYTHONWARNINGS": "ignore"}


def in_fresh_process(concern: str, request: dict, timeout: float = 1800) -> dict:
    """``child(request)`` of the registered ``concern``, run in a fresh Python; its JSON answer.

    The child is ``python -m scripts.bench --child CONCERN REQUEST`` (see cli.py); it prints its
    answer as the last line. A failure comes back as ``{"error": its last line of stderr}``.
    """
    env = dict(os.environ) | FRESH_PROCESS_ENV
    command = [sys.executable, "-m", "scripts.bench", "--child", concern, json.dumps(request)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def keep_freed_memory() -> str:
    """Ask glibc to keep freed blocks for reuse instead of handing them back to the kernel.

    By default glibc returns big freed blocks at once (and serves blocks over its mmap threshold from
    fresh mappings), so memory a trace held comes back on the next call as fresh pages, each zeroed by
    the kernel on first touch: a cost that grows with the bytes recorded. This applies to every row
    alike; it only changes the process's allocator, not any library.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default (no glibc here: --malloc-keep did nothing)"
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    ok = libc.mallopt(m_trim_threshold, 2**31 - 1) and libc.mallopt(m_mmap_threshold, 32 * 2**20)  # 32 MiB: glibc's max
    return "glibc keeps freed memory (mallopt: trim threshold 2 GiB, mmap threshold 32 MiB)" if ok else "mallopt failed"


# ---------------------------------------------------------------------------------------------
# The machine


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "transformer-lens", "safetensors"):
        try:
            found[package.replace("-", "_")] = version(package)
        except PackageNotFoundError:
            found[package.replace("-", "_")] = "not installed"
    return found


def hardware(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s+(.+)", out).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} logical CPUs"


def load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None
