"""One forward pass, side by side: minigpt (plain and recording taps), HuggingFace, TransformerLens.

One random-weight checkpoint of GPT-2 small's shape written once in the official HF layout, every
library loaded from it. Contenders are timed in alternation (one call of each per round, in a
shuffled order, after warm-up rounds); the headline is the median over all calls, with the median
over the calls no other process slowed down beside it (see ``harness.time_round_robin``). Peak
memory is measured per contender in a fresh process (CPU: growth of the resident set during one
call, with glibc told to return freed memory at once; GPU: ``torch.cuda.max_memory_allocated``).
"""
from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from pathlib import Path

import torch

from minigpt import GPTConfig
from minigpt.config import DTYPES

from . import harness
from .concern import Concern
from .contenders import Call, Models, QUICK_CONFIG, bench_checkpoint, forward_contenders, tl_available
from .report import mib


def forward_flops(cfg: GPTConfig, batch: int, seq: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one forward: the projections, attention, the unembedding.

    Attention's q.k and pattern.v are counted over the full S x S square, as is usual, although
    causal kernels may skip the masked half. The same count serves every row (useful work).
    """
    D, M, L, V, T = cfg.n_embd, cfg.d_mlp, cfg.n_layer, cfg.vocab_size, batch * seq
    projections = 2 * T * (3 * D * D + D * D + 2 * D * M)
    attention = 2 * 2 * batch * seq * seq * D
    return L * (projections + attention) + 2 * T * D * V


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


# ---------------------------------------------------------------------------------------------
# Memory, one contender at a time


def measure_memory(call: Call, tokens: torch.Tensor, device: str) -> dict:
    """Peak memory a call adds on top of what was live before it (models, inputs), and what it records."""
    with torch.no_grad():
        for _ in range(2):  # warm-up: lazy initialisation, allocator pools, compilation
            out = call(tokens)
            del out
        gc.collect()
        (logits, recorded), memory = harness.peak_during(lambda: call(tokens), device)
    return {**memory, "recorded_bytes": harness.unique_bytes(recorded),
            "recorded_bytes_beyond_logits": harness.unique_bytes(recorded, leave_out=logits),
            "recorded_tensors": len(recorded), "logits_bytes": logits.numel() * logits.element_size()}


def _tokens(cfg: GPTConfig, batch: int, seq: int, device: str) -> torch.Tensor:
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    return tokens.to(device)


def memory_subprocess(name: str, args: argparse.Namespace, checkpoint: Path) -> dict:
    """``measure_memory`` for one contender in a fresh Python, so nothing else shares its heap."""
    request = {"name": name, "checkpoint": str(checkpoint), "device": args.device, "dtype": args.dtype,
               "batch": args.batch, "seq": args.seq, "threads": args.threads or 0, "compile": args.compile,
               "quick": args.quick}
    measured = harness.in_fresh_process("forward", request)
    return {"memory_error": measured["error"]} if "error" in measured else measured


def child(request: dict) -> dict:
    """The fresh process's side of ``memory_subprocess``."""
    if request["threads"]:
        torch.set_num_threads(request["threads"])
    device = request["device"]
    models = Models(Path(request["checkpoint"]), device, DTYPES[request["dtype"]])
    row = {c.name: c for c in forward_contenders(device, request["compile"], False)}[request["name"]]
    cfg = QUICK_CONFIG if request["quick"] else GPTConfig()
    return measure_memory(row.make(models), _tokens(cfg, request["batch"], request["seq"], device), device)


# ---------------------------------------------------------------------------------------------
# What bounds recording every tap: fresh memory


def page_calls(recorded: list[torch.Tensor]) -> tuple[Callable[[], None], Callable[[], None], int]:
    """Two calls writing the bytes ``recorded`` holds (each distinct storage once): into fresh memory,
    as a run keeping them must (every page new: the kernel maps and zeroes it), and into buffers kept
    across calls, as a plain forward's reused activations are. Their difference is the cost of fresh
    pages, which no implementation that returns that many new bytes avoids."""
    sizes = list({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in recorded}.values())
    kept = [torch.empty(n, dtype=torch.uint8) for n in sizes]

    def fresh() -> None:
        for n in sizes:
            torch.empty(n, dtype=torch.uint8).fill_(1)

    def warm() -> None:
        for buffer in kept:
            buffer.fill_(1)
    return fresh, warm, sum(sizes)


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace, log=print) -> dict:
    device, dtype = args.device, DTYPES[args.dtype]
    checkpoint, cfg = bench_checkpoint(Path(args.out), args.quick)
    skip_tl = args.skip_tl or not tl_available()
    rows = forward_contenders(device, args.compile, skip_tl)
    models = Models(checkpoint, device, dtype)
    tokens = _tokens(cfg, args.batch, args.seq, device)

    log(f"forward: loading {len(rows)} contenders ({device}, {args.dtype}, {args.batch} x {args.seq})")
    calls = {row.name: row.make(models) for row in rows}
    with torch.no_grad():
        reference = calls["minigpt_plain"](tokens)[0].float()
        agreement = {name: float((call(tokens)[0].float() - reference).abs().max()) for name, call in calls.items()}
        pages = page_calls(calls["minigpt_all"](tokens)[1]) if device == "cpu" else None
    ceiling_call, ceiling_flops = matmul_ceiling_call(device, dtype, args.quick)

    log(f"forward: {args.warmup} warm-up + {args.repeats} measured rounds, contenders in shuffled order")
    timed = {name: (lambda call=call: call(tokens)) for name, call in calls.items()}
    extra = {"_matmul": ceiling_call, **({"_fresh_pages": pages[0], "_warm_pages": pages[1]} if pages else {})}
    with torch.no_grad():
        times = harness.time_round_robin({**timed, **extra}, device, args.warmup, args.repeats,
                                         torch.get_num_threads(), log)
    ceiling = ceiling_flops / times.pop("_matmul").headline()
    fresh_pages = None
    if pages:
        fresh_pages = {"bytes": pages[2], "fresh_s": times.pop("_fresh_pages").headline(),
                       "warm_s": times.pop("_warm_pages").headline()}
        fresh_pages["cost_s"] = max(0.0, fresh_pages["fresh_s"] - fresh_pages["warm_s"])

    memory: dict[str, dict] = {}
    if args.memory != "off":
        del calls, timed
        for row in rows:
            log(f"forward memory: {row.name}")
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
                        "median_s": median, "median_quiet_calls_s": t.quiet_median(),
                        "quiet_calls": len(t.quiet()), "calls": len(t.seconds), "min_s": min(t.seconds),
                        "times_s": t.seconds, "cpu_shares": t.shares,
                        "tokens_per_s": args.batch * args.seq / median,
                        "fraction_of_ceiling": flops / median / ceiling,
                        "max_abs_logit_diff_vs_minigpt": agreement[row.name], **memory.get(row.name, {})})
    _compare_with_plain(results, device)
    return {"batch": args.batch, "seq": args.seq,
            "model": "quick tiny config" if args.quick else "GPT-2 small shape (124M), random weights",
            "config": cfg.to_hf(), "warmup_rounds": args.warmup, "repeats": args.repeats, "forward_flops": flops,
            "matmul_ceiling_flops_per_s": ceiling, "allocator": args.allocator,
            "tl_skipped": "--skip-tl" if args.skip_tl else ("transformer_lens not installed" if skip_tl else None),
            "fresh_pages": fresh_pages,
            "results": results, "target_values": target_values({r["name"]: r for r in results}, device, fresh_pages)}


def _compare_with_plain(results: list[dict], device: str) -> None:
    """Add each row's time ratios, and its extra memory over its library's plain row per byte recorded."""
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


def target_values(r: dict[str, dict], device: str, fresh_pages: dict | None = None) -> dict[str, float]:
    """The measured values of the forward targets (targets.TARGETS), by key."""
    plain = r["minigpt_plain"]["median_s"]
    if fresh_pages:  # every tap, less what fresh pages for its bytes cost (measured in the same rounds)
        values_beyond = (r["minigpt_all"]["median_s"] - fresh_pages["cost_s"]) / plain
    values = {"forward.plain_vs_hf": plain / min(r["hf_eager_plain"]["median_s"], r["hf_sdpa_plain"]["median_s"]),
              "forward.resid4_over_plain": r["minigpt_resid4"]["median_s"] / plain,
              "forward.all_over_plain": r["minigpt_all"]["median_s"] / plain,
              "forward.resid4_memory": r["minigpt_resid4"].get("memory_over_plain_per_recorded_byte"),
              "forward.all_memory": r["minigpt_all"].get("memory_over_plain_per_recorded_byte")}
    if fresh_pages:
        values["forward.all_over_plain_beyond_fresh_pages"] = values_beyond
    if "tl_cache_all" in r:
        tl = r["tl_cache_all"]["median_s"]
        values["forward.all_vs_tl"] = r["minigpt_all"]["median_s"] / tl
        values["forward.all_but_heads_vs_tl"] = r["minigpt_all_but_heads"]["median_s"] / tl
    if device.startswith("cuda") and "minigpt_resid4_compiled" in r:
        values["forward.gpu_compiled_resid4_speedup"] = (r["hf_eager_hidden_hooks"]["median_s"]
                                                         / r["minigpt_resid4_compiled"]["median_s"])
    return values


# ---------------------------------------------------------------------------------------------
# The table


def markdown(section: dict) -> str:
    lines = [
        f"batch {section['batch']} x seq {section['seq']}, {section['model']}; {section['repeats']} rounds "
        f"(more if disturbed), contenders in shuffled order, after {section['warmup_rounds']} warm-up rounds. "
        f"Matmul ceiling measured in the same rounds: {section['matmul_ceiling_flops_per_s'] / 1e9:,.0f} GFLOP/s; "
        f"forward = {section['forward_flops'] / 1e9:,.1f} GFLOP. Allocator: {section['allocator']}.",
        "",
        "| contender | median ms | median ms, quiet calls | quiet calls | min ms | tokens/s | x HF sdpa plain "
        "| x minigpt plain | of ceiling | peak extra MiB | recorded MiB | (peak - plain's) / recorded "
        "| max abs logit diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in section["results"]:
        over = r.get("memory_over_plain_per_recorded_byte")
        lines.append(
            f"| {r['label']} | {r['median_s'] * 1e3:,.1f} | {r['median_quiet_calls_s'] * 1e3:,.1f} "
            f"| {r['quiet_calls']}/{r['calls']} | {r['min_s'] * 1e3:,.1f} | {r['tokens_per_s']:,.0f} "
            f"| {r['ratio_to_hf_sdpa_plain']:.3f} "
            f"| {r['ratio_to_minigpt_plain']:.3f} | {r['fraction_of_ceiling']:.2f} | {mib(r.get('peak_extra_bytes'))} "
            f"| {mib(r.get('recorded_bytes')) if r['kind'] == 'record' else '-'} "
            f"| {f'{over:.2f}' if over is not None else '-'} | {r['max_abs_logit_diff_vs_minigpt']:.1e} |")
    lines += ["", "Median ms = median over all measured calls; tokens/s, ratios, 'of ceiling' and the targets use it. "
              "Quiet calls: on CPU, the calls during which this process's threads ran at least "
              f"{harness.QUIET_SHARE:.0%} as much of the wall time as in that row's best call (share = process "
              "time / (wall x threads), about 1 when quiet and all threads busy); their median is beside it.",
              "", "Peak extra = highest memory during one call above what was live before it (weights, inputs); it "
              "includes the logits. Recorded = bytes of the distinct storages the recorded tensors hold (minigpt's "
              "resid_pre of block L+1 is the same tensor as resid_post of block L, counted once). "
              "(peak - plain's) / recorded: the peak above the same library's plain forward, over the recorded "
              "bytes other than the logits (which the plain forward returns too); TL rows compare with HF eager "
              "plain. 'of ceiling' = forward FLOPs / median time / matmul ceiling."]
    pages = section.get("fresh_pages")
    if pages:
        by_name = {r["name"]: r for r in section["results"]}
        excess = by_name["minigpt_all"]["median_s"] - by_name["minigpt_plain"]["median_s"]
        lines += ["", f"What bounds every tap: it returns {mib(pages['bytes'])} MiB of new tensors. Writing those "
                  f"bytes into fresh memory took {pages['fresh_s'] * 1e3:,.1f} ms, into buffers kept across calls "
                  f"{pages['warm_s'] * 1e3:,.1f} ms (medians, same rounds): fresh pages cost "
                  f"{pages['cost_s'] * 1e3:,.1f} ms of every tap's {excess * 1e3:,.1f} ms over the plain forward."]
    if section.get("tl_skipped"):
        lines += ["", f"TransformerLens rows skipped: {section['tl_skipped']}."]
    return "\n".join(lines)


CONCERN = Concern("forward", "one forward pass: minigpt plain and recording taps, HF (+ hooks), TransformerLens",
                  default=True, run=run, markdown=markdown, child=child)
