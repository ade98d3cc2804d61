#!/usr/bin/env python
"""Forward-pass benchmark, side by side: minigpt (plain and recording taps), HuggingFace, TransformerLens.

One run, one random-weight checkpoint of GPT-2 small's shape written once in the official HF layout,
every library loaded from it. Contenders are timed in alternation (one call of each per round, after
warm-up rounds), so that drift or noise on the machine hits all of them alike; the tables give medians
over the calls that other processes did not slow down (see ``time_round_robin``), and over all calls.
Peak memory is measured per contender in a fresh subprocess (CPU: growth of the resident set during one
call, with glibc told to return freed memory at once; GPU: ``torch.cuda.max_memory_allocated``).

    .venv/bin/python scripts/bench.py                      # the CPU table: fp32, 2 threads, 8 x 128
    .venv/bin/python scripts/bench.py --quick              # tiny model and shape: a smoke run
    .venv/bin/python scripts/bench.py --malloc-keep        # the same with glibc keeping freed memory
    .venv/bin/python scripts/bench.py --device cuda --compile   # GPU: bf16, 8 x 1024, compiled rows too

Writes ``bench.json`` and ``bench.md`` to ``--out`` (default ``bench-results/``). TransformerLens
(``pip install transformer-lens==3.9.0``) and psutil are optional: missing ones are skipped and said so.
With ``--decode`` and ``scripts/bench_decode.py`` present, its ``decode_rows(...)`` adds a decode table.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.weights import to_hf_state_dict  # noqa: E402

FOUR = ["blocks.*.resid_pre", "blocks.*.attn_delta", "blocks.*.mlp_delta", "blocks.*.resid_post"]
TL_FOUR = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
QUICK_CONFIG = GPTConfig(vocab_size=1000, n_positions=64, n_embd=64, n_layer=2, n_head=4)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A call takes the tokens [B, S] and returns (logits [B, S, V], the tensors it recorded).
Call = Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]


# ---------------------------------------------------------------------------------------------
# The models, each loaded at most once per process, all from the same checkpoint directory.
# ---------------------------------------------------------------------------------------------

class Models:
    def __init__(self, checkpoint: Path, device: str, dtype: torch.dtype):
        self.checkpoint, self.device, self.dtype = checkpoint, device, dtype

    @cached_property
    def minigpt(self) -> GPT:
        return GPT.from_pretrained(self.checkpoint, dtype=self.dtype, device=self.device)

    @cached_property
    def minigpt_compiled(self) -> GPT:
        # A second instance: compiling changes how the module is called, and the eager rows must stay eager.
        model = GPT.from_pretrained(self.checkpoint, dtype=self.dtype, device=self.device)
        model.compile(fullgraph=True)
        return model

    def hf(self, attention: str):
        return self._hf[attention]

    @cached_property
    def _hf(self) -> dict:
        return _LazyDict(self._load_hf)

    def _load_hf(self, attention: str):
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        compiled = attention.endswith("+compile")
        model = GPT2LMHeadModel.from_pretrained(self.checkpoint, attn_implementation=attention.removesuffix("+compile"),
                                                dtype=self.dtype).to(self.device).eval()
        return torch.compile(model) if compiled else model  # not fullgraph: HF's graph is not ours to fix

    @cached_property
    def tl(self):
        """TransformerLens HookedTransformer with the same weights, no weight processing at all."""
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

        hf = self._load_hf("eager")  # a private copy: TL's loader only reads it
        c = hf.config
        # Built by hand: from_pretrained* only accepts names from TL's list of official models,
        # and this checkpoint is a local random-weight one.
        cfg = HookedTransformerConfig(
            d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd,
            n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size,
            act_fn=c.activation_function, normalization_type="LN", original_architecture="GPT2LMHeadModel",
            scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx, default_prepend_bos=False,
            dtype=self.dtype, device=self.device)
        model = HookedTransformer(cfg, move_to_device=True)
        # The same switches as from_pretrained_no_processing: no folding, no centring.
        model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                          center_unembed=False, fold_value_biases=False,
                                          refactor_factored_attn_matrices=False)
        return model.eval()


class _LazyDict(dict):
    def __init__(self, load):
        super().__init__()
        self.load = load

    def __missing__(self, key):
        self[key] = value = self.load(key)
        return value


# ---------------------------------------------------------------------------------------------
# The contenders.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Contender:
    name: str       # key in the JSON
    label: str      # row in the table
    library: str    # "minigpt", "hf" or "tl": the rows whose memory is compared to that library's plain row
    make: Callable[[Models], Call]
    kind: str = "record"  # "plain" (nothing recorded) or "record"


def minigpt_plain(compiled: bool = False) -> Callable[[Models], Call]:
    def make(models: Models) -> Call:
        model = models.minigpt_compiled if compiled else models.minigpt
        return lambda tokens: (model(tokens), [])
    return make


def minigpt_taps(taps, compiled: bool = False, **options) -> Callable[[Models], Call]:
    """``taps``: names or patterns, or a function of the model that lists them."""
    def make(models: Models) -> Call:
        model = models.minigpt_compiled if compiled else models.minigpt
        names = taps(model) if callable(taps) else taps

        def call(tokens):
            logits, trace = model.run(tokens, taps=names, **options)
            return logits, list(trace.values())
        return call
    return make


def hf_plain(attention: str) -> Callable[[Models], Call]:
    def make(models: Models) -> Call:
        model = models.hf(attention)
        return lambda tokens: (model(input_ids=tokens, use_cache=False).logits, [])
    return make


def hf_hidden_and_hooks(attention: str) -> Callable[[Models], Call]:
    """The notes' way: output_hidden_states, plus forward hooks on both c_proj of every block."""
    def make(models: Models) -> Call:
        model = models.hf(attention)
        projections = [m for block in model.transformer.h for m in (block.attn.c_proj, block.mlp.c_proj)]

        def call(tokens):
            kept: list[torch.Tensor] = []
            handles = [p.register_forward_hook(lambda mod, args, out: kept.append(out.detach())) for p in projections]
            try:
                out = model(input_ids=tokens, use_cache=False, output_hidden_states=True)
            finally:
                for h in handles:
                    h.remove()
            return out.logits, [*out.hidden_states, *kept]
        return call
    return make


def tl_cache(four_only: bool) -> Callable[[Models], Call]:
    def make(models: Models) -> Call:
        model = models.tl
        names_filter = (lambda name: name.endswith(TL_FOUR)) if four_only else None

        def call(tokens):
            logits, cache = model.run_with_cache(tokens, names_filter=names_filter)
            return logits, list(cache.values())
        return call
    return make


def contenders(device: str, compile: bool, skip_tl: bool) -> list[Contender]:
    """Every row of the table, in its order."""
    rows = [
        Contender("minigpt_plain", "minigpt plain", "minigpt", minigpt_plain(), "plain"),
        Contender("minigpt_resid4", "minigpt, 4 residual taps x every block", "minigpt", minigpt_taps(FOUR)),
        Contender("minigpt_all", "minigpt, every tap (\"*\")", "minigpt", minigpt_taps("*")),
        # TransformerLens's cache has no per-head outputs unless use_attn_result=True (off by default):
        # this row records what its full cache holds, for a like-for-like comparison.
        Contender("minigpt_all_but_heads", "minigpt, every tap but attn.heads (TL's full cache's set)", "minigpt",
                  minigpt_taps(lambda model: [n for n in model.tap_names if not n.endswith("attn.heads")])),
        # The memory-saving options of Taps: a lower dtype, and only some positions.
        Contender("minigpt_all_bf16", "minigpt, every tap, kept in bf16 (dtype=)", "minigpt",
                  minigpt_taps("*", dtype=torch.bfloat16)),
        Contender("minigpt_resid4_last", "minigpt, 4 residual taps, last position (positions=)", "minigpt",
                  minigpt_taps(FOUR, positions=slice(-1, None))),
    ]
    if device.startswith("cuda"):
        rows.append(Contender("minigpt_resid4_to_cpu", "minigpt, 4 residual taps, kept on CPU (to=)", "minigpt",
                              minigpt_taps(FOUR, to="cpu")))
    rows += [
        Contender("hf_eager_plain", "HF plain, eager attention", "hf_eager", hf_plain("eager"), "plain"),
        Contender("hf_sdpa_plain", "HF plain, sdpa attention (transformers 5 default)", "hf_sdpa",
                  hf_plain("sdpa"), "plain"),
        Contender("hf_eager_hidden_hooks", "HF eager, output_hidden_states + c_proj hooks", "hf_eager",
                  hf_hidden_and_hooks("eager")),
        Contender("hf_sdpa_hidden_hooks", "HF sdpa, output_hidden_states + c_proj hooks", "hf_sdpa",
                  hf_hidden_and_hooks("sdpa")),
    ]
    if not skip_tl:
        rows += [
            Contender("tl_cache_all", "TransformerLens run_with_cache, every hook", "tl", tl_cache(False)),
            Contender("tl_cache_resid4", "TransformerLens run_with_cache, 4 residual hooks", "tl", tl_cache(True)),
        ]
    if compile:
        rows += [
            Contender("minigpt_plain_compiled", "minigpt plain, torch.compile", "minigpt", minigpt_plain(True), "plain"),
            Contender("minigpt_resid4_compiled", "minigpt, 4 residual taps, torch.compile", "minigpt",
                      minigpt_taps(FOUR, compiled=True)),
            Contender("hf_sdpa_plain_compiled", "HF plain sdpa, torch.compile", "hf_sdpa",
                      hf_plain("sdpa+compile"), "plain"),
        ]
    return rows


# ---------------------------------------------------------------------------------------------
# Measuring.
# ---------------------------------------------------------------------------------------------

def forward_flops(cfg: GPTConfig, batch: int, seq: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward: the projections, attention, the unembedding.

    Attention's q.k and pattern.v are counted over the full S x S square, as is usual, although
    causal kernels may skip the masked half. The same count serves every row (useful work).
    """
    D, M, L, V, T = cfg.n_embd, cfg.d_mlp, cfg.n_layer, cfg.vocab_size, batch * seq
    projections = 2 * T * (3 * D * D + D * D + 2 * D * M)
    attention = 2 * 2 * batch * seq * seq * D
    return L * (projections + attention) + 2 * T * D * V


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_ceiling_call(device: str, dtype: torch.dtype, quick: bool) -> tuple[Callable[[], None], int]:
    """A big square matmul (the machine's practical ceiling) and its FLOPs per call."""
    n = 512 if quick else (8192 if device.startswith("cuda") else 2048)
    reps = 1 if quick else (10 if device.startswith("cuda") else 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def call():
        for _ in range(reps):
            torch.mm(a, b)
    return call, 2 * n**3 * reps


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
        """Median of the quiet calls; of all calls if fewer than 3 were quiet."""
        quiet = self.quiet()
        return statistics.median(quiet if len(quiet) >= 3 else self.seconds)


def time_round_robin(calls: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int,
                     threads: int, log=print) -> dict[str, Timings]:
    """Time each entry: every round calls each once, in turn; warm-up rounds are dropped.

    On a shared machine other processes take cores away in bursts. On CPU each call's process time
    over (wall time x threads) says how much of the call our threads actually ran (about 1 for a
    quiet call whose work is spread over all threads); a call whose share is below QUIET_SHARE times
    the best share among that entry's calls was disturbed. Up to ``repeats // 2`` extra rounds run
    while some entry has fewer than ``repeats // 2`` (at least 3) quiet calls.
    """
    timings = {name: Timings([], []) for name in calls}
    cpu = not device.startswith("cuda")
    enough = min(repeats, max(3, repeats // 2))
    round_ = 0
    while round_ < warmup + repeats or (round_ < warmup + repeats + repeats // 2
                                        and min(len(t.quiet()) for t in timings.values()) < enough):
        for name, call in calls.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            result = call()
            sync(device)
            elapsed, used = time.perf_counter() - start, time.process_time() - start_cpu
            del result  # freed before the next contender runs
            if round_ >= warmup:
                timings[name].seconds.append(elapsed)
                timings[name].shares.append(used / (elapsed * threads) if cpu else None)
        round_ += 1
        quiet = min(len(t.quiet()) for t in timings.values())
        log(f"  round {round_}" + (" (warm-up)" if round_ <= warmup else f", fewest quiet calls: {quiet}"))
    return timings


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _can_reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure_memory(call: Call, tokens: torch.Tensor, device: str) -> dict:
    """Peak memory a call adds on top of what was live before it (models, inputs), and what it holds.

    CPU: the resident set's high-water mark (Linux VmHWM, reset just before the call). Run it in a fresh
    process with MALLOC_MMAP_THRESHOLD_ set (see ``memory_subprocess``) so that freed tensors really
    leave the resident set; else the figure understates. GPU: torch.cuda.max_memory_allocated.
    """
    with torch.no_grad():
        for _ in range(2):  # warm-up: lazy initialisation, allocator pools, compilation
            out = call(tokens)
            del out
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            logits, recorded = call(tokens)
            torch.cuda.synchronize()
            peak, held = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
            method = "torch.cuda.max_memory_allocated"
        elif _can_reset_peak():
            base = _status_bytes("VmRSS")
            _can_reset_peak()
            logits, recorded = call(tokens)
            peak, held = _status_bytes("VmHWM") - base, _status_bytes("VmRSS") - base
            method = "VmHWM - VmRSS before (Linux)"
        else:  # e.g. macOS: ru_maxrss never goes down, so this is only right if the call sets a new peak
            base = _rss_fallback()
            logits, recorded = call(tokens)
            scale = 1 if sys.platform == "darwin" else 1024
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - base
            held, method = _rss_fallback() - base, "ru_maxrss (approximate)"
    return {"peak_extra_bytes": int(peak), "held_after_bytes": int(held), "recorded_bytes": unique_bytes(recorded),
            "recorded_bytes_beyond_logits": unique_bytes(recorded, leave_out=logits),
            "recorded_tensors": len(recorded), "logits_bytes": logits.numel() * logits.element_size(),
            "memory_method": method}


def _rss_fallback() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        return 0


def memory_subprocess(name: str, args: argparse.Namespace, checkpoint: Path) -> dict:
    """Run ``measure_memory`` for one contender in a fresh Python, so nothing else shares its heap."""
    env = dict(os.environ)
    # glibc otherwise keeps freed large blocks (its mmap threshold adapts upward), hiding real peaks.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONWARNINGS="ignore")
    command = [sys.executable, __file__, "--memory-of", name, "--checkpoint", str(checkpoint),
               "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(args.seq),
               "--threads", str(args.threads or 0)]
    command += ["--compile"] * args.compile + ["--quick"] * args.quick
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode:
        return {"memory_error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The checkpoint and the run.
# ---------------------------------------------------------------------------------------------

def write_checkpoint(directory: Path, cfg: GPTConfig, seed: int = 0) -> Path:
    """A random-weight GPT-2 in the official HF layout (config.json + model.safetensors, no prefix)."""
    from safetensors.torch import save_file

    if not (directory / "model.safetensors").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        model = GPT.random(cfg, seed=seed)
        save_file(to_hf_state_dict(model.state_dict(), cfg.n_layer, official=True), str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(cfg.to_hf(), indent=1))
    return directory


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "transformer_lens"):
        try:
            from importlib.metadata import version
            found[package] = version(package.replace("_", "-"))
        except Exception:
            found[package] = "not installed"
    return found


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s+(.+)", out).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} logical CPUs"


def tl_available() -> bool:
    return importlib.util.find_spec("transformer_lens") is not None


def run(args: argparse.Namespace, log=print) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    cfg = QUICK_CONFIG if args.quick else GPTConfig()
    out = Path(args.out)
    checkpoint = write_checkpoint(out / ("checkpoint-quick" if args.quick else "checkpoint-gpt2-small"), cfg)
    skip_tl = args.skip_tl or not tl_available()
    rows = contenders(device, args.compile, skip_tl)
    models = Models(checkpoint, device, dtype)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)

    log(f"loading {len(rows)} contenders ({device}, {args.dtype}, {args.batch} x {args.seq})")
    calls = {row.name: row.make(models) for row in rows}
    with torch.no_grad():
        reference = calls["minigpt_plain"](tokens)[0].float()
        agreement = {name: float((call(tokens)[0].float() - reference).abs().max()) for name, call in calls.items()}
    ceiling_call, ceiling_flops = matmul_ceiling_call(device, dtype, args.quick)

    log(f"timing: {args.warmup} warm-up + {args.repeats} measured rounds, contenders alternating")
    timed = {name: (lambda call=call: call(tokens)) for name, call in calls.items()}
    with torch.no_grad():
        times = time_round_robin({**timed, "_matmul": ceiling_call}, device, args.warmup, args.repeats,
                                 torch.get_num_threads(), log)
    ceiling = ceiling_flops / times.pop("_matmul").headline()

    memory: dict[str, dict] = {}
    if args.memory != "off":
        del calls, timed
        for row in rows:
            log(f"memory: {row.name}")
            if args.memory == "subprocess":
                memory[row.name] = memory_subprocess(row.name, args, checkpoint)
            else:
                memory[row.name] = measure_memory(row.make(models), tokens, device)

    flops = forward_flops(cfg, args.batch, args.seq)
    results = []
    for row in rows:
        t = times[row.name]
        median = t.headline()
        results.append({"name": row.name, "label": row.label, "library": row.library, "kind": row.kind,
                        "median_s": median, "median_all_calls_s": statistics.median(t.seconds),
                        "quiet_calls": len(t.quiet()), "calls": len(t.seconds), "min_s": min(t.seconds),
                        "times_s": t.seconds, "cpu_shares": t.shares,
                        "tokens_per_s": args.batch * args.seq / median,
                        "fraction_of_ceiling": flops / median / ceiling,
                        "max_abs_logit_diff_vs_minigpt": agreement[row.name], **memory.get(row.name, {})})
    by_name = {r["name"]: r for r in results}
    plain_of = {"minigpt": "minigpt_plain", "hf_eager": "hf_eager_plain", "hf_sdpa": "hf_sdpa_plain",
                "tl": "hf_eager_plain"}  # TL's plain forward is not a row; HF eager is its nearest kin
    hf_ref = by_name["hf_sdpa_plain"]["median_s"]
    for r in results:
        r["ratio_to_hf_sdpa_plain"] = r["median_s"] / hf_ref
        r["ratio_to_minigpt_plain"] = r["median_s"] / by_name["minigpt_plain"]["median_s"]
        plain = by_name[plain_of[r["library"]]]
        recorded = r.get("recorded_bytes_beyond_logits")
        # On CPU the resident set moves by a MiB or so between identical calls: below a few MiB
        # recorded, the ratio would be noise.
        big_enough = recorded and (device.startswith("cuda") or recorded >= 4 * 2**20)
        if r["kind"] == "record" and big_enough and "peak_extra_bytes" in plain:
            r["memory_over_plain_bytes"] = r["peak_extra_bytes"] - plain["peak_extra_bytes"]
            r["memory_over_plain_per_recorded_byte"] = r["memory_over_plain_bytes"] / recorded

    report = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hardware": hardware(device), "versions": versions(), "device": device, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq, "model": "quick tiny config"
        if args.quick else "GPT-2 small shape (124M), random weights", "config": cfg.to_hf(),
        "warmup_rounds": args.warmup, "repeats": args.repeats, "forward_flops": flops,
        "matmul_ceiling_flops_per_s": ceiling, "load_average": _load_average(), "command": args.command,
        "allocator": args.allocator,
        "tl_skipped": "--skip-tl" if args.skip_tl else ("transformer_lens not installed" if skip_tl else None),
        "results": results,
    }
    report["targets"] = check_targets(by_name, device)
    if args.decode:
        report["decode"] = decode_rows(args, checkpoint, log)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    (out / "bench.md").write_text(markdown(report))
    return report


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


def _load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def check_targets(r: dict[str, dict], device: str) -> list[dict]:
    """The performance issue's targets, each with the measured value and whether it holds."""
    def target(text, value, limit, holds):
        return {"target": text, "value": value, "limit": limit, "holds": bool(holds)}

    plain = r["minigpt_plain"]["median_s"]
    hf_best = min(r["hf_eager_plain"]["median_s"], r["hf_sdpa_plain"]["median_s"])
    found = [
        target("minigpt plain no slower than HF plain (faster of eager/sdpa)", plain / hf_best, 1.0, plain <= hf_best),
        target("4 residual taps of every block: time over minigpt plain", r["minigpt_resid4"]["median_s"] / plain,
               1.03, r["minigpt_resid4"]["median_s"] <= 1.03 * plain),
        target("every tap: time over minigpt plain", r["minigpt_all"]["median_s"] / plain, 1.15,
               r["minigpt_all"]["median_s"] <= 1.15 * plain),
    ]
    if "tl_cache_all" in r:
        tl = r["tl_cache_all"]["median_s"]
        found.append(target("every tap vs TransformerLens full cache (time ratio, lower is better)",
                            r["minigpt_all"]["median_s"] / tl, 1.0, r["minigpt_all"]["median_s"] < tl))
        found.append(target("the same set as TL's full cache (all but attn.heads) vs TL full cache (time ratio)",
                            r["minigpt_all_but_heads"]["median_s"] / tl, 1.0, r["minigpt_all_but_heads"]["median_s"] < tl))
    for name in ("minigpt_resid4", "minigpt_all"):
        ratio = r[name].get("memory_over_plain_per_recorded_byte")
        if ratio is not None:
            found.append(target(f"{name}: extra peak memory over minigpt plain / bytes recorded", ratio, 1.15,
                                ratio <= 1.15))
    if device.startswith("cuda") and "minigpt_resid4_compiled" in r:
        speedup = r["hf_eager_hidden_hooks"]["median_s"] / r["minigpt_resid4_compiled"]["median_s"]
        found.append(target("GPU: compiled 4-residual recording vs HF eager output_hidden_states (speed-up)",
                            speedup, 2.5, speedup >= 2.5))
    return found


def decode_rows(args: argparse.Namespace, checkpoint: Path, log) -> list[dict] | str:
    """Decode speed from scripts/bench_decode.py (generation issue), when that file exists."""
    path = Path(__file__).with_name("bench_decode.py")
    if not path.is_file():
        return "scripts/bench_decode.py not found: no decode figures"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    log("decode: scripts/bench_decode.py")
    return module.decode_rows(checkpoint=checkpoint, device=args.device, dtype=DTYPES[args.dtype], quick=args.quick)


# ---------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.1f}" if isinstance(b, (int, float)) else "-"  # noqa: E731
    v = report["versions"]
    lines = [
        f"**{report['date']}**, {report['hardware']}, {report['device']} {report['dtype']}, "
        f"{report['threads']} threads, batch {report['batch']} x seq {report['seq']}, {report['model']}; "
        f"torch {v['torch']}, transformers {v['transformers']}, transformer-lens {v['transformer_lens']}. "
        f"{report['repeats']} alternating rounds (more if disturbed) after {report['warmup_rounds']} warm-up rounds. "
        f"Matmul ceiling measured in the same rounds: {report['matmul_ceiling_flops_per_s'] / 1e9:,.0f} GFLOP/s; "
        f"forward = {report['forward_flops'] / 1e9:,.1f} GFLOP. "
        f"Allocator: {report['allocator']}. Load average at the end: {report['load_average']}.",
        "",
        "| contender | median ms | quiet calls | median ms, all calls | min ms | tokens/s | x HF sdpa plain "
        "| x minigpt plain | of ceiling | peak extra MiB | recorded MiB | (peak - plain's) / recorded "
        "| max abs logit diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        over = r.get("memory_over_plain_per_recorded_byte")
        lines.append(
            f"| {r['label']} | {r['median_s'] * 1e3:,.1f} | {r['quiet_calls']}/{r['calls']} "
            f"| {r['median_all_calls_s'] * 1e3:,.1f} | {r['min_s'] * 1e3:,.1f} | {r['tokens_per_s']:,.0f} "
            f"| {r['ratio_to_hf_sdpa_plain']:.3f} "
            f"| {r['ratio_to_minigpt_plain']:.3f} | {r['fraction_of_ceiling']:.2f} | {mib(r.get('peak_extra_bytes'))} "
            f"| {mib(r.get('recorded_bytes')) if r['kind'] == 'record' else '-'} "
            f"| {f'{over:.2f}' if over is not None else '-'} | {r['max_abs_logit_diff_vs_minigpt']:.1e} |")
    lines += ["", "Median ms = median of the quiet calls: on CPU, the calls during which this process's threads ran "
              f"at least {QUIET_SHARE:.0%} as much of the wall time as in that row's best call (share = process "
              "time / (wall x threads), about 1 when quiet and all threads busy); calls that other "
              "processes slowed down are left out of it but kept in 'all calls' and the JSON. Tokens/s, ratios, "
              "'of ceiling' and the targets use the quiet median.",
              "", "Peak extra = highest memory during one call above what was live before it (weights, inputs); it "
              "includes the logits. Recorded = bytes of the distinct storages the recorded tensors hold (minigpt's "
              "resid_pre of block L+1 is the same tensor as resid_post of block L, counted once). "
              "(peak - plain's) / recorded: the peak above the same library's plain forward, over the recorded "
              "bytes other than the logits (which the plain forward returns too); TL rows compare with HF eager "
              "plain. 'of ceiling' = forward FLOPs / median time / matmul ceiling.", ""]
    if report.get("tl_skipped"):
        lines += [f"TransformerLens rows skipped: {report['tl_skipped']}.", ""]
    lines += ["| target | measured | limit | holds |", "|---|---:|---:|---|"]
    lines += [f"| {t['target']} | {t['value']:.3f} | {t['limit']} | {'yes' if t['holds'] else 'NO'} |"
              for t in report["targets"]]
    decode = report.get("decode")
    if isinstance(decode, list) and decode:
        keys = list(decode[0])
        lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(f"{d.get(k):.4g}" if isinstance(d.get(k), float) else str(d.get(k)) for k in keys)
                  + " |" for d in decode]
    elif isinstance(decode, str):
        lines += ["", decode]
    lines += ["", f"Rerun: `{report['command']}`", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--batch", type=int, default=None, help="default 8 (2 with --quick)")
    p.add_argument("--seq", type=int, default=None, help="default 128 on CPU, 1024 on GPU (16 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="measured rounds (default 10; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2 on CPU; 0 = leave as is)")
    p.add_argument("--skip-tl", action="store_true", help="leave TransformerLens out")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd rows (slow to compile on CPU)")
    p.add_argument("--decode", action="store_true", help="add decode speed from scripts/bench_decode.py")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 x 16 tokens, 2 rounds: a smoke run")
    p.add_argument("--memory", choices=["subprocess", "inprocess", "off"], default=None,
                   help="how to measure peak memory (default: subprocess; inprocess with --quick)")
    p.add_argument("--malloc-keep", action="store_true",
                   help="time with glibc keeping freed memory (see keep_freed_memory); memory rows are unaffected")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--memory-of", help=argparse.SUPPRESS)   # internal: measure one contender, print JSON
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)  # internal, with --memory-of
    args = p.parse_args(argv)
    args.command = "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    gpu = args.device.startswith("cuda")
    defaults = dict(dtype="bfloat16" if gpu else "float32", batch=2 if args.quick else 8,
                    seq=16 if args.quick else (1024 if gpu else 128), repeats=2 if args.quick else 10,
                    warmup=1 if args.quick else 2, threads=None if gpu else 2,
                    memory="inprocess" if args.quick else "subprocess")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:  # the subprocess side of memory_subprocess
        models = Models(Path(args.checkpoint), args.device, DTYPES[args.dtype])
        row = {c.name: c for c in contenders(args.device, args.compile, False)}[args.memory_of]
        cfg = QUICK_CONFIG if args.quick else GPTConfig()
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        print(json.dumps(measure_memory(row.make(models), tokens.to(args.device), args.device)))
        return
    args.allocator = keep_freed_memory() if args.malloc_keep else "default (glibc as configured)"
    report = run(args)
    print((Path(args.out) / "bench.md").read_text())
    del report


if __name__ == "__main__":
    main()
