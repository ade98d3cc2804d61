"""Greedy decode speed: minigpt's KV-cache generation beside HuggingFace ``generate``, and the memory floor.

    .venv/bin/python -m scripts.bench --decode              # a section of the whole bench
    .venv/bin/python -m scripts.bench.decode                # alone: CPU, fp32, batch 1 and 8, 32 prompt + 256 new
    .venv/bin/python -m scripts.bench.decode --quick        # tiny model and shape: a smoke run
    .venv/bin/python -m scripts.bench.decode --device cuda --dtype bfloat16

One row per (contender, batch): contender, batch, tokens_per_s (new tokens of the whole batch per
second, prefill included), ms_per_step, x_floor (ms_per_step / floor), floor_ms_per_step, copy_GBps,
same_as_hf (greedy ids equal HF's). Without a checkpoint, seeded random weights of GPT-2 small's shape.

The memory floor: one decode step reads every weight once (the whole unembedding, but one row of the
position table), so a step cannot take less than weight bytes / memory bandwidth. The bandwidth is that
of copying a 1 GiB tensor, measured in the same run and counted as STREAM does (bytes read + written).
The KV cache is read too (at batch 8 it adds up to ~20% of the weight bytes at these lengths); the floor
leaves it out: the floor is the weights' bytes alone. Contenders are timed in alternation, one call each per round
in a shuffled order (harness.time_round_robin); the figures are medians over all calls.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minigpt import GPT, GPTConfig, fast_decode
from minigpt.config import DTYPES

from . import harness
from .concern import Concern
from .contenders import QUICK_CONFIG, bench_checkpoint, hf_twin
from .report import table


def copy_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Bytes per second moved by copying one large tensor (read + write counted), best of ``repeats``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        harness.sync(device.type)
        start = time.perf_counter()
        dst.copy_(src)
        harness.sync(device.type)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def weight_bytes_per_step(model: GPT) -> int:
    """Bytes of weights one decode step reads: all of them but the position table (one row of it)."""
    pos = model.pos_embed.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - pos.numel() * pos.element_size() + pos.shape[1] * pos.element_size()


def measure(model_dir: str | Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
            batch_sizes: tuple[int, ...] = (1, 8), prompt_len: int = 32, new_tokens: int = 256, repeats: int = 3,
            compile: bool = False, hf: bool = True, config: GPTConfig | None = None, log=print) -> list[dict]:
    """Time greedy generation of ``new_tokens`` after a ``prompt_len`` prompt; one dict per contender and batch."""
    device = torch.device(device)
    if model_dir is not None:
        model = GPT.from_pretrained(model_dir, dtype=dtype, device=device)
    else:
        model = GPT.random(config or "gpt2", seed=0, dtype=dtype, device=device)
    twin = hf_twin(model) if hf else None
    bandwidth = copy_bandwidth(device)
    floor_s = weight_bytes_per_step(model) / bandwidth
    rows = []
    for batch in batch_sizes:
        prompt = torch.randint(model.cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
        prompt = prompt.to(device)
        contenders: dict[str, Callable[[int], torch.Tensor]] = {
            "minigpt": lambda n: model.generate(prompt, n, temperature=0)}
        if compile:
            contenders["minigpt compile=True"] = lambda n: model.generate(prompt, n, temperature=0, compile=True)
        if twin is not None:
            def hf_generate(n: int, cache: str | None = None) -> torch.Tensor:
                with torch.inference_mode():
                    return twin.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                         min_new_tokens=n, do_sample=False, pad_token_id=model.cfg.vocab_size - 1,
                                         cache_implementation=cache)
            contenders["HF generate"] = hf_generate
            static = "HF generate, static cache" + (" (compiled)" if device.type == "cuda" else "")
            contenders[static] = lambda n: hf_generate(n, "static")
        for call in contenders.values():  # warm-up (and compilation), on a short generation
            call(min(8, new_tokens))
        outputs: dict[str, torch.Tensor] = {}  # each contender's ids, kept to compare with HF's

        def timed(name: str, call: Callable[[int], torch.Tensor]) -> Callable[[], None]:
            return lambda: outputs.__setitem__(name, call(new_tokens))
        log(f"decode, batch {batch}: {repeats} rounds")
        times = harness.time_round_robin({name: timed(name, call) for name, call in contenders.items()}, device.type,
                                         warmup=0, repeats=repeats, threads=torch.get_num_threads(), log=log)
        reference = outputs.get("HF generate")
        rowdot = compile and batch == 1 and device.type == "cpu" and fast_decode.rowdot_pays(model.unembedding)
        for name, timings in times.items():
            step = timings.headline() / new_tokens
            rows.append({"contender": name, "batch": batch, "tokens_per_s": round(batch / step, 1),
                         "ms_per_step": round(step * 1e3, 2), "x_floor": round(step / floor_s, 2),
                         "floor_ms_per_step": round(floor_s * 1e3, 2), "copy_GBps": round(bandwidth / 1e9, 1),
                         "same_as_hf": None if reference is None else bool(torch.equal(outputs[name], reference)),
                         "one_row_linears": ("RowDot (measured faster)" if rowdot else "BLAS (measured faster)")
                         if "compile" in name and device.type == "cpu" and batch == 1 else "-"})
    return rows


def target_values(rows: list[dict]) -> dict[str, float]:
    """The measured values of the decode targets (targets.TARGETS), by key."""
    step = {(r["contender"], r["batch"]): r for r in rows}
    values = {}
    if ("minigpt", 1) in step and ("HF generate", 1) in step:
        values["decode.batch1_vs_hf"] = step["minigpt", 1]["ms_per_step"] / step["HF generate", 1]["ms_per_step"]
    if ("minigpt compile=True", 1) in step:
        values["decode.compiled_batch1_x_floor"] = step["minigpt compile=True", 1]["x_floor"]
        values["decode.compiled_batch1_vs_eager"] = (step["minigpt compile=True", 1]["ms_per_step"]
                                                     / step["minigpt", 1]["ms_per_step"])
    return values


def run(args: argparse.Namespace, log=print) -> dict:
    """The decode section of the whole bench: GPT-2 small's checkpoint (random tiny weights with --quick)."""
    dtype = DTYPES[args.dtype]
    if args.quick:
        rows = measure(None, args.device, dtype, batch_sizes=(1, 2), prompt_len=8, new_tokens=16, repeats=2,
                       config=QUICK_CONFIG, log=log)
    else:
        checkpoint, _ = bench_checkpoint(Path(args.out), quick=False)
        rows = measure(checkpoint, args.device, dtype, compile=True, log=log)
    return {"rows": rows, "target_values": target_values(rows)}


def markdown(section: dict) -> str:
    rows = section["rows"]
    return (f"Greedy decode; memory floor = weight bytes per step / copy bandwidth = {rows[0]['floor_ms_per_step']} "
            f"ms per step (copy bandwidth {rows[0]['copy_GBps']} GB/s, read + write counted).\n\n" + table(rows))


CONCERN = Concern("decode", "greedy decode tokens/s vs HF generate, and the memory-bandwidth floor",
                  default=False, run=run, markdown=markdown)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: random weights, GPT-2 small shape)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="add minigpt with compile=True (torch.compile; static cache and CUDA graphs on a GPU)")
    p.add_argument("--no-hf", action="store_true", help="skip HuggingFace")
    p.add_argument("--quick", action="store_true", help="tiny model and shape: a smoke run")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = dict(batch_sizes=tuple(args.batch_sizes), prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    if args.quick:
        shape = dict(batch_sizes=(1, 2), prompt_len=8, new_tokens=16)
    load = os.getloadavg()
    rows = measure(args.model, args.device, DTYPES[args.dtype], repeats=args.repeats, compile=args.compile,
                   hf=not args.no_hf, config=QUICK_CONFIG if args.quick else None, log=lambda line: None, **shape)
    print(f"greedy decode, {args.device} {args.dtype}, {torch.get_num_threads()} threads, prompt {shape['prompt_len']} + "
          f"{shape['new_tokens']} new tokens, {'random weights' if args.model is None else args.model}; "
          f"load average before/after: {load[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print(markdown({"rows": rows}))


if __name__ == "__main__":
    main()
