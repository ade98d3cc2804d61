#!/usr/bin/env python
"""Greedy decode speed: minigpt's KV-cache generation beside HuggingFace ``generate``, and the memory floor.

    .venv/bin/python scripts/bench_decode.py                   # CPU, fp32, batch 1 and 8, 32 prompt + 256 new
    .venv/bin/python scripts/bench_decode.py --quick           # tiny model and shape: a smoke run
    .venv/bin/python scripts/bench_decode.py --device cuda --dtype bfloat16

For scripts/bench.py (``--decode``), two functions:

    run(model_dir=None, device="cpu", dtype=torch.float32, batch_sizes=(1, 8), prompt_len=32,
        new_tokens=256, repeats=3, compile=False, hf=True) -> list[dict]   (compile: add compile=True)
    decode_rows(checkpoint, device, dtype, quick=False) -> list[dict]     (run() with bench.py's arguments)

One dict per (contender, batch): contender, batch, tokens_per_s (new tokens of the whole batch per
second, prefill included), ms_per_step, x_floor (ms_per_step / floor), floor_ms_per_step, copy_GBps,
same_as_hf (greedy ids equal HF's). ``model_dir=None`` uses seeded random weights of GPT-2 small's shape.

The memory floor: one decode step reads every weight once (the whole unembedding, but one row of the
position table), so a step cannot take less than weight bytes / memory bandwidth. The bandwidth is that
of copying a 1 GiB tensor, measured in the same run and counted as STREAM does (bytes read + written).
The KV cache is read too (at batch 8 it adds up to ~20% of the weight bytes at these lengths); the floor
leaves it out, as the issue defines it. Contenders are timed in alternation, one call each per round,
so that noise from other processes hits all alike; the figures are medians over ``repeats`` rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.weights import to_hf_state_dict  # noqa: E402

QUICK = GPTConfig(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 2**30, repeats: int = 5) -> float:
    """Bytes per second moved by copying one large tensor (read + write counted), best of ``repeats``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def weight_bytes_per_step(model: GPT) -> int:
    """Bytes of weights one decode step reads: all of them but the position table (one row of it)."""
    pos = model.pos_embed.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - pos.numel() * pos.element_size() + pos.shape[1] * pos.element_size()


def hf_twin(model: GPT):
    """HuggingFace's GPT2LMHeadModel (default attention, SDPA) with the same weights, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    weight = model.embed.weight
    last = model.cfg.vocab_size - 1  # GPT-2's end token, or the last id of a smaller test vocabulary
    config = GPT2Config(**model.cfg.to_hf(), bos_token_id=last, eos_token_id=last)
    hf = GPT2LMHeadModel(config).to(dtype=weight.dtype, device=weight.device).eval()
    state = to_hf_state_dict(model.state_dict(), model.cfg.n_layer, official=False)
    hf.load_state_dict(state | {"lm_head.weight": state["transformer.wte.weight"]})
    return hf


def run(model_dir: str | Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
        batch_sizes: tuple[int, ...] = (1, 8), prompt_len: int = 32, new_tokens: int = 256, repeats: int = 3,
        compile: bool = False, hf: bool = True, config: GPTConfig | None = None) -> list[dict]:
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
        times: dict[str, list[float]] = {name: [] for name in contenders}
        outputs = {}
        for name, call in contenders.items():  # warm-up (and compilation)
            call(min(8, new_tokens))
        for _ in range(repeats):
            for name, call in contenders.items():
                sync(device)
                start = time.perf_counter()
                outputs[name] = call(new_tokens)
                sync(device)
                times[name].append(time.perf_counter() - start)
        reference = outputs.get("HF generate")
        for name, spent in times.items():
            seconds = statistics.median(spent)
            step = seconds / new_tokens
            rows.append({"contender": name, "batch": batch, "tokens_per_s": round(batch * new_tokens / seconds, 1),
                         "ms_per_step": round(step * 1e3, 2), "x_floor": round(step / floor_s, 2),
                         "floor_ms_per_step": round(floor_s * 1e3, 2), "copy_GBps": round(bandwidth / 1e9, 1),
                         "same_as_hf": None if reference is None else bool(torch.equal(outputs[name], reference))})
    return rows


def decode_rows(checkpoint: str | Path | None, device: str, dtype: torch.dtype, quick: bool = False) -> list[dict]:
    """``run`` with scripts/bench.py's arguments (a tiny model and shape when ``quick``)."""
    if quick:
        return run(None, device, dtype, batch_sizes=(1, 2), prompt_len=8, new_tokens=16, repeats=2, config=QUICK)
    return run(checkpoint, device, dtype, compile=True)


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


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
    rows = run(args.model, args.device, DTYPES[args.dtype], repeats=args.repeats, compile=args.compile,
               hf=not args.no_hf, config=QUICK if args.quick else None, **shape)
    print(f"greedy decode, {args.device} {args.dtype}, {torch.get_num_threads()} threads, prompt {shape['prompt_len']} + "
          f"{shape['new_tokens']} new tokens, {'random weights' if args.model is None else args.model}; "
          f"load average before/after: {load[0]:.1f}/{os.getloadavg()[0]:.1f}")
    print(f"memory floor = weight bytes per step / copy bandwidth = {rows[0]['floor_ms_per_step']} ms per step "
          f"(copy bandwidth {rows[0]['copy_GBps']} GB/s, read + write counted)\n")
    print(table(rows))


if __name__ == "__main__":
    main()
