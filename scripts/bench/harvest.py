"""Harvest throughput: ``minigpt.harvest`` writing the four residual taps of every block to disk in
bf16, beside the plain forward on the same windows and a hand-written HF + hooks harvester.

    .venv/bin/python -m scripts.bench --no-forward --harvest     # this section alone
    .venv/bin/python -m scripts.bench --quick --no-forward --harvest

The corpus: JSONL documents of words that are one GPT-2 token each, so that every window is full
(``--seq`` tokens; 4 windows per document), a shard of one batch each. The contenders, timed in alternation (one call each
per round, shuffled), each over the whole corpus, ``--batch`` windows per forward:

  minigpt forward, plain      ``model(tokens)`` per batch, logits included: the reference of the target
  minigpt forward, stopped    ``model.run(tokens, stop_at=last block's resid_post)``: the forward harvest runs
  minigpt harvest             ``harvest(...)`` from the JSONL file to a finished directory (reading,
                              tokenizing, hashing the weights, writing shards, fsync, manifest: all of it)
  HF forward, GPT2Model       HF's forward without an LM head, no hooks: the forward the next one runs
  HF + hooks harvester        GPT2Model with forward hooks on every block, its attention and its MLP,
                              bf16 copies collected per batch and written with safetensors' save_file:
                              the same rows and index in the same shards

Every call starts with ``os.sync()`` (untimed), so that none pays for the disk writes another left:
the HF harvester leaves its shards to the kernel's write-back, minigpt's harvest flushes its own
(fsync) inside its time. Peak memory of the harvest is measured in a fresh process
(harness.peak_during) and set beside its bound: the forward of one batch, three shard buffers and
the harvest's bookkeeping (weights not counted).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from minigpt import GPT
from minigpt.memory import HARVEST_BOOKKEEPING_BYTES, forward_bytes

from . import harness
from .concern import Concern
from .contenders import FOUR, QUICK_CONFIG, hf_twin
from .report import mib, table

# --quick's tiny model, with GPT-2's whole vocabulary: the corpus is tokenized with GPT-2's BPE.
QUICK = dataclasses.replace(QUICK_CONFIG, vocab_size=50257)
# Documents of 4 windows each: 48 windows, 6 shards of one batch each at the default --batch 8.
DOCUMENTS = 12
WORDS = "the of and to in is was for on with as by at from his her it that this city river house".split()


def write_corpus(path: Path, model: GPT, documents: int, tokens_per_document: int) -> Path:
    """JSONL documents of exactly ``tokens_per_document`` tokens (words that are one token each)."""
    words = [w for w in WORDS if len(model.tokenizer.encode(" " + w)) == 1]
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(documents):
            f.write(json.dumps({"text": "".join(" " + rng.choice(words) for _ in range(tokens_per_document))}) + "\n")
    return path


def windows_of(path: Path, model: GPT, seq: int) -> torch.Tensor:
    """The corpus's windows as one tensor [N, seq] (every document a whole number of windows)."""
    ids = [model.tokenizer.encode(json.loads(line)["text"]) for line in path.read_text().splitlines()]
    return torch.tensor(ids).view(-1, seq)


def hf_hooks_harvester(hf, windows: torch.Tensor, out: Path, batch: int, windows_per_shard: int,
                       tokens_per_document: int) -> None:
    """What one writes by hand today: hooks that keep bf16 copies, a list per tap, save_file per shard.

    Its shards are minigpt's: ``windows_per_shard`` whole windows each (the last one what is left),
    whatever the batch size, so both write the same files' worth of rows under the same size bound.
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    kept: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, x) -> None:
        x = x[0] if isinstance(x, tuple) else x
        kept.setdefault(name, []).append(x.detach().to(torch.bfloat16).flatten(0, 1))

    hooks = []
    for layer, block in enumerate(hf.h):
        p = f"blocks.{layer}."
        hooks += [
            block.register_forward_pre_hook(lambda m, args, kwargs, p=p: keep(p + "resid_pre", args[0] if args else
                                                                               kwargs["hidden_states"]),
                                            with_kwargs=True),
            block.attn.register_forward_hook(lambda m, args, output, p=p: keep(p + "attn_delta", output)),
            block.mlp.register_forward_hook(lambda m, args, output, p=p: keep(p + "mlp_delta", output)),
            block.register_forward_hook(lambda m, args, output, p=p: keep(p + "resid_post", output))]
    tokens = windows.flatten()
    seq = windows.shape[1]
    shard, start, end = 0, 0, 0  # rows [start, end) wait in ``kept``

    def flush(rows: int) -> None:
        """The first ``rows`` rows kept -> the next shard file; the rest stay kept."""
        nonlocal shard, start
        row = torch.arange(start, start + rows)  # the index, as harvest stores it
        everything = {name: torch.cat(parts) for name, parts in kept.items()}
        tensors = {name: t[:rows] for name, t in everything.items()}
        tensors |= {"index.document": row // tokens_per_document, "index.position": row % tokens_per_document,
                    "index.token": tokens[start:start + rows].to(torch.int32)}
        save_file(tensors, str(out / f"shard-{shard:06d}.safetensors"))
        kept.clear()
        kept.update({name: [t[rows:]] for name, t in everything.items() if len(t) > rows})
        shard, start = shard + 1, start + rows

    try:
        with torch.inference_mode():
            for i in range(0, len(windows), batch):
                hf(windows[i:i + batch])
                end += windows[i:i + batch].numel()
                while end - start >= windows_per_shard * seq:
                    flush(windows_per_shard * seq)
            if end > start:
                flush(end - start)
    finally:
        for hook in hooks:
            hook.remove()


def contenders(args: argparse.Namespace, model: GPT, corpus: Path, windows: torch.Tensor, work: Path,
               shard_bytes: int, per_document: int) -> dict[str, Callable[[], None]]:
    """The five timed calls by name, each over all ``windows`` [N, seq] (harvests write under ``work``)."""
    windows_per_shard = args.batch  # one batch per shard, as measure() sized ``shard_bytes``
    last = f"blocks.{model.cfg.n_layer - 1}.resid_post"
    hf = hf_twin(model).transformer  # GPT2Model: no LM head, as a harvester needs none
    calls_made = {"n": 0}

    def fresh(name: str) -> Path:
        calls_made["n"] += 1
        return work / f"{name}-{calls_made['n']}"

    def plain() -> None:
        with torch.inference_mode():
            for i in range(0, len(windows), args.batch):
                model(windows[i:i + args.batch])

    def stopped() -> None:
        for i in range(0, len(windows), args.batch):
            model.run(windows[i:i + args.batch], stop_at=last)

    def hf_forward() -> None:
        with torch.inference_mode():
            for i in range(0, len(windows), args.batch):
                hf(windows[i:i + args.batch])

    def ours() -> None:
        from minigpt.harvest import harvest
        harvest(model, corpus, FOUR, fresh("minigpt"), context=args.seq, batch_size=args.batch,
                store_dtype=torch.bfloat16, shard_bytes=shard_bytes, quiet=True)

    def theirs() -> None:
        hf_hooks_harvester(hf, windows, fresh("hf"), args.batch, windows_per_shard, per_document)

    return {"minigpt forward, plain (logits)": plain, "minigpt forward, stopped after the last block": stopped,
            "minigpt harvest, 4 residual taps, bf16, to disk": ours, "HF GPT2Model forward, no hooks": hf_forward,
            "HF GPT2Model + hooks harvester, bf16, save_file": theirs}


def measure(args: argparse.Namespace, log=print) -> dict:
    """Time the contenders in alternation and measure the harvest's peak memory: the section's JSON."""
    cfg = QUICK if args.quick else "gpt2"
    model = GPT.random(cfg, seed=0)
    work = Path(args.out) / "harvest-work"
    shutil.rmtree(work, ignore_errors=True)
    per_document = 4 * args.seq
    corpus = write_corpus(work / "corpus.jsonl", model, 2 if args.quick else DOCUMENTS, per_document)
    windows = windows_of(corpus, model, args.seq)
    row_bytes = 4 * model.cfg.n_layer * model.cfg.n_embd * 2 + 20
    # A shard holds exactly one batch: a batch never spans two shards (runner.py) and a long harvest's
    # shards (256 MiB by default) hold whole batches; several shards, so that the buffers are reused
    # as in a long harvest and the last shard's write, which nothing overlaps, is a small part.
    shard_bytes = args.batch * args.seq * row_bytes
    calls = contenders(args, model, corpus, windows, work, shard_bytes, per_document)
    log(f"harvest: {windows.numel()} tokens ({len(windows)} windows of {args.seq}), batch {args.batch}")
    # os.sync before every call: the HF harvester leaves its shards to the kernel's write-back (minigpt's
    # harvest flushes its own), which would otherwise land in whichever call runs next.
    times = harness.time_round_robin(calls, "cpu", warmup=1, repeats=max(2, args.repeats // 3),
                                     threads=torch.get_num_threads(), log=log, before_each=os.sync)
    tokens = windows.numel()
    plain_s = times["minigpt forward, plain (logits)"].headline()
    rows = [{"contender": name, "median_s": round(t.headline(), 3), "tokens_per_s": round(tokens / t.headline(), 1),
             "x_plain_tokens_per_s": round(plain_s / t.headline(), 3), "quiet_median_s": round(t.quiet_median(), 3),
             "calls": len(t.seconds), "quiet_calls": len(t.quiet())}
            for name, t in times.items()]
    memory = harness.in_fresh_process("harvest", {"quick": args.quick, "seq": args.seq, "batch": args.batch,
                                                  "corpus": str(corpus), "shard_bytes": shard_bytes,
                                                  "out": str(work / "memory")})
    bound = (forward_bytes(model.cfg, args.batch, args.seq, 4, logits=False) + 3 * (shard_bytes // row_bytes) * row_bytes
             + HARVEST_BOOKKEEPING_BYTES)
    shutil.rmtree(work, ignore_errors=True)
    by = {r["contender"]: r for r in rows}
    return {"tokens": tokens, "batch": args.batch, "seq": args.seq, "shard_bytes": shard_bytes,
            "model": "random weights, " + ("tiny" if args.quick else "GPT-2 small") + " shape, fp32",
            "written_bytes_per_call": memory.get("written_bytes"), "rows": rows, "peak": memory, "peak_bound_bytes": bound,
            "target_values": {
                "harvest.vs_plain": by["minigpt harvest, 4 residual taps, bf16, to disk"]["x_plain_tokens_per_s"],
                "harvest.vs_hf_hooks": (by["HF GPT2Model + hooks harvester, bf16, save_file"]["median_s"]
                                        / by["minigpt harvest, 4 residual taps, bf16, to disk"]["median_s"])}}


def child(request: dict) -> dict:
    """Peak memory of one harvest call, in a fresh process (the model, its tokenizer, the corpus and a
    first forward made before measuring)."""
    from minigpt.harvest import harvest

    model = GPT.random(QUICK if request["quick"] else "gpt2", seed=0)
    # One-off costs of any process that runs the model, paid before measuring as the weights are: GPT-2's
    # BPE tables (about 24 MiB) and the math library's scratch from a first forward (about 16 MiB).
    model.tokenizer.encode("loaded")
    model.run(torch.zeros(request["batch"], request["seq"], dtype=torch.long),
              stop_at=f"blocks.{model.cfg.n_layer - 1}.resid_post")
    manifest, memory = harness.peak_during(lambda: harvest(
        model, request["corpus"], FOUR, request["out"], context=request["seq"], batch_size=request["batch"],
        shard_bytes=request["shard_bytes"], quiet=True), "cpu")
    return memory | {"written_bytes": manifest["bytes"]}


def markdown(section: dict) -> str:
    peak = section["peak"]
    return (f"{section['tokens']:,} tokens ({section['model']}), windows of {section['seq']}, batch {section['batch']}, "
            f"shards of at most {mib(section['shard_bytes'])} MiB; contenders in shuffled order, medians over all calls "
            "(the targets use them); quiet_median_s: over the calls no other process disturbed (harness.Timings). "
            f"Harvest peak memory above the loaded model, in a fresh process: {mib(peak.get('peak_extra_bytes'))} MiB "
            f"(bound: forward of one batch + 3 shard buffers + bookkeeping = {mib(section['peak_bound_bytes'])} MiB).\n\n"
            + table(section["rows"]))


CONCERN = Concern("harvest", "minigpt.harvest to disk vs the plain forward and an HF + hooks harvester",
                  default=False, run=measure, markdown=markdown, child=child)
