"""Train GPT-2 from scratch: the whole loop, on the model of model.py as it is.

Read ``train`` top to bottom: the model and its optimizer, the output directory, the data; then
``_steps``, one step at a time: learning rate, forward and loss, backward, clip, update (none if the
loss or gradient norm is NaN or inf: training stops there, or skips the step if told to); every so
often a validation loss and a checkpoint. Under ``torchrun`` each process takes its share of every step's windows and DDP
averages the gradients, so the step is the same as one process doing all of it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .. import distributed
from ..config import END_OF_TEXT_ID, GPTConfig, config_of, is_integer
from ..checks import check_int
from ..errors import TrainingError
from ..files import checked_directory, claim_directory
from ..inputs import check_placement
from ..model import GPT
from . import checkpoint, data, eval as metrics
from .baselines import baselines
from .eval import evaluate, loss_of
from .settings import Settings, check_fits


def learning_rate(step: int, s: Settings) -> float:
    """Linear warm-up to ``lr`` (reached at step ``warmup - 1``), then a cosine towards ``min_lr``,
    which it reaches at step ``steps``, one past the last (as nanoGPT's schedule)."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (s.lr - s.min_lr)


def make_optimizer(model: GPT, s: Settings) -> torch.optim.AdamW:
    """AdamW with the usual two groups: decay for matrices and embeddings, none for biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": s.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = model.unembedding.device.type == "cuda"
    return torch.optim.AdamW(groups, lr=s.lr, betas=(s.beta1, s.beta2), fused=fused or None)


def train(data_paths, size: str | GPTConfig | Path | None, out: str | Path, settings: Settings = Settings(), *,
          init: str | Path | None = None, device: str = "cpu", lines: bool = False, save_every: int = 500,
          compile: bool = False, quiet: bool = False, skip_nonfinite: int = 0) -> dict:
    """Train a GPT-2 of ``size`` (an official name, a GPTConfig, or a config.json) on ``data_paths``.

    Checkpoints go to ``out`` in HuggingFace's layout (see checkpoint.py) every ``save_every`` steps
    and at the end. Started again over the same ``out`` with the same settings, it goes on from the
    last checkpoint, and the losses are those the uninterrupted run would have had. ``init``: start
    from a checkpoint's weights instead of random ones. A step whose loss or gradient norm is NaN or
    inf stops training with a TrainingError (no update applied, nothing saved from it), unless fewer
    than ``skip_nonfinite`` steps of the run were skipped so far: then it is skipped (logged, no update).
    ``out`` must be missing, empty, or a run of this function's. Returns the final state (step, losses).
    A finished (or unfinished) run goes on to a larger ``settings.steps`` given over the same ``out``: the
    cosine keeps its first end and the added steps run at ``min_lr`` (state's ``schedule_steps``).
    Besides the checkpoints: DIR/metrics.jsonl (a line per step), DIR/loss.png (at each checkpoint), a
    sample of text at each evaluation and the loss over the whole validation split at the last step.
    """
    out = Path(out)
    if (size is None) == (init is None):
        raise TrainingError("give a size (--size: train from scratch) or init (--init CHECKPOINT: go on from its "
                            "weights), one of them")
    _check_save_every(save_every)
    check_int(skip_nonfinite, "skip_nonfinite (--skip-nonfinite)", 0, error=TrainingError)
    device = check_placement(torch.float32, device)
    with distributed.process_group(device) as (rank, world):
        torch.manual_seed(settings.seed + rank)  # each process's dropout
        model = _model(size, init, settings, device)
        optimizer = make_optimizer(model, settings)
        _on_rank0(lambda: _open_out(out, model), rank, world, "opening --out")
        windows = _data(data_paths, out / "data", settings, lines, rank, world)
        identity = {"settings": asdict(settings), "config": asdict(model.cfg), "init": str(init) if init else None,
                    "global_batch": settings.global_batch(world)}

        state = _resume(out, identity, model, optimizer, rank)
        if rank == 0:
            metrics.rewrite_metrics(out, state["log"], metrics.costs(model, settings.context))
        model.train()
        ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else None
        step_fn = ddp or model
        if compile:
            step_fn = torch.compile(step_fn)
        progress = _progress(settings.steps, state["step"], quiet or rank != 0)
        try:
            _steps(state, model, ddp, step_fn, optimizer, windows, settings, out, (rank, world), save_every,
                   skip_nonfinite, progress)
        except TrainingError:  # a failed run leaves the directory as its last checkpoint: metrics too
            if rank == 0:
                saved = checkpoint.load_state(out, check=False)
                metrics.rewrite_metrics(out, saved["log"] if saved else [], metrics.costs(model, settings.context))
            raise
        progress.close()
        model.eval()
        return state


def _steps(state: dict, model: GPT, ddp, step_fn, optimizer, windows: tuple[data.Windows, data.Windows],
           s: Settings, out: Path, ranks: tuple[int, int], save_every: int, skip_nonfinite: int, progress) -> None:
    """Train from ``state['step']`` to ``s.steps``, logging each step into ``state`` and saving checkpoints."""
    (rank, world), (train_windows, _) = ranks, windows
    random = s.repeat_tokens == "random"
    order = data.Order(len(train_windows), s.seed, s.repeat, s.context, random)
    vocab_size = model.cfg.vocab_size
    device = model.unembedding.device
    committed = state["step"] or None  # the checkpoint on disk: named if training diverges
    skipped = sum("skipped" in entry for entry in state["log"])
    schedule = s if state["schedule_steps"] == s.steps else replace(s, steps=state["schedule_steps"])
    cost = metrics.costs(model, s.context)
    while state["step"] < s.steps:
        started = time.perf_counter()
        step = state["step"]
        lr = learning_rate(step, schedule)
        micro_batches = order.for_step(step, s.batch_size, s.grad_accum, rank, world)
        batches = [train_windows.batch(p.windows, device, p.repeats, (p.seeds, vocab_size) if random else None)
                   for p in micro_batches]
        loss, norm = train_step(model, ddp, step_fn, optimizer, lr, batches, s.grad_clip, s.autocast(device))
        state["step"] = step = step + 1
        if math.isfinite(loss) and math.isfinite(norm):
            entry = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                     "tokens_per_s": s.global_batch(world) * s.context / (time.perf_counter() - started)}
        elif skipped < skip_nonfinite:
            skipped += 1
            entry = {"step": step, "lr": lr, "skipped": f"loss {loss}, gradient norm {norm}: no update applied"}
        else:
            raise TrainingError(
                f"training diverged at step {step}: the loss is {loss} and the gradient norm {norm}; no update was "
                f"applied and nothing of it is saved: {checkpoint.last_good(out, committed)}. Lower --lr, raise "
                "--warmup or set --grad-clip and train into a new --out (--init from the last good checkpoint), "
                f"or run the same command with --skip-nonfinite N to skip up to N such steps ({skipped} skipped)")
        _evaluations(entry, model, windows, s, rank, world)
        state["log"].append(entry)
        _show(progress, entry)
        if rank == 0:
            metrics.append_metrics(out, entry, cost)
        if step % save_every == 0 or step == s.steps:
            checkpoint.save(out, model, optimizer, state, rank, world, committed)
            committed = step
            if rank == 0:
                metrics.plot_losses(out, state["log"])


def _evaluations(entry: dict, model: GPT, windows: tuple[data.Windows, data.Windows], s: Settings, rank: int,
                 world: int) -> None:
    """At an evaluation step: the validation loss and (rank 0) a seeded sample of text; at the last step
    also the loss over every validation window, and (rank 0) what counting gets on those same windows
    (``baselines``: uniform, unigram, bigram), so that the loss is read against them."""
    step, (train_windows, val_windows) = entry["step"], windows
    if step % s.eval_every == 0 or step == s.steps:
        entry["val_loss"] = evaluate(model, val_windows, s, rank, world)
        if rank == 0:
            entry["sample"] = metrics.sample_text(model)
    if step == s.steps:
        entry["val_loss_full"] = evaluate(model, val_windows, replace(s, eval_windows=len(val_windows)), rank, world)
        if rank == 0:
            entry["baselines"] = baselines(train_windows.tokens, val_windows, model.cfg.vocab_size)


def train_step(model: GPT, ddp, step_fn, optimizer: torch.optim.AdamW, lr: float,
               batches: list[tuple[torch.Tensor, torch.Tensor]], grad_clip: float,
               autocast: bool | None = None) -> tuple[float, float]:
    """One optimizer step over this process's micro-batches (inputs, targets [B, S]) -> (loss, gradient norm).

    The loss is the mean over every process's windows; under DDP the gradients are averaged across
    processes once, at the last micro-batch (``no_sync`` before it). A loss or gradient norm that is
    NaN or inf applies no update (every process sees the same two numbers, so all of them skip it).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = torch.zeros((), device=model.unembedding.device)
    for micro, (inputs, targets) in enumerate(batches):
        last = micro == len(batches) - 1
        with contextlib.nullcontext() if last or ddp is None else ddp.no_sync():
            micro_loss = loss_of(step_fn, inputs, targets, autocast) / len(batches)
            micro_loss.backward()
        loss += micro_loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    if ddp is not None:  # the mean over processes (SUM then divide: gloo has no AVG before torch 2.7)
        torch.distributed.all_reduce(loss)
        loss /= torch.distributed.get_world_size()
    loss_value, norm_value = loss.item(), norm.item()
    if math.isfinite(loss_value) and math.isfinite(norm_value):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


def _model(size, init, s: Settings, device: str) -> GPT:
    """GPT-2's initial weights (seeded), or those of ``init``; the dropout of ``s`` if it sets one."""
    start = GPT.from_pretrained(init, device=device) if init is not None else None
    cfg = start.cfg if start is not None else config_of(size, TrainingError, "--size")
    if s.dropout is not None:
        cfg = GPTConfig(**{**asdict(cfg), "embd_pdrop": s.dropout, "attn_pdrop": s.dropout, "resid_pdrop": s.dropout})
    if cfg.vocab_size <= END_OF_TEXT_ID:
        raise TrainingError(f"the corpus is tokenized with GPT-2's BPE (ids up to {END_OF_TEXT_ID}), but this "
                            f"model's vocabulary has {cfg.vocab_size}; use vocab_size 50257")
    if s.context > cfg.n_positions:
        raise TrainingError(f"--context {s.context} is longer than the model's {cfg.n_positions} positions; "
                            "lower it or use a config with more positions")
    check_fits(s, cfg, device)  # before anything is allocated: an absurd config or batch fails here
    model = GPT.random(cfg, seed=s.seed, device=device)
    if start is not None:
        model.load_state_dict(start.state_dict())
    return model


def _on_rank0(work, rank: int, world: int, what: str):
    """``work()`` on rank 0 alone; its result, or its failure as a TrainingError, reaches every rank (which wait)."""
    result, problem = None, None
    if rank == 0:
        try:
            result = work()
        except Exception as e:  # whatever it is, every rank must hear of it rather than wait
            problem = str(e) if isinstance(e, TrainingError) else f"{what} failed: {type(e).__name__}: {e}"
    result, problem = distributed.gather((result, problem), world)[0]
    if problem:
        raise TrainingError(problem)
    return result


def _open_out(out: Path, model: GPT) -> None:
    """``out`` claimed as a training run (refused unless missing, empty or one of minigpt's runs), then put
    back to its committed checkpoint before anything else: DIR's model that step's, what killed runs left removed."""
    claim_directory(out, "train", TrainingError)
    checked_directory(out / "training", TrainingError, what="checkpoints", way_out="train into a new --out")
    for name in (checkpoint.WEIGHTS_FILE, checkpoint.CONFIG_FILE):  # the export replaces a file, never a directory
        if os.path.isdir(out / name) and not os.path.islink(out / name):
            raise TrainingError(f"{out / name} is a directory, not the file of the model minigpt exports there; "
                                "train into a new --out")
    state = checkpoint.load_state(out, max_bytes=checkpoint.file_limit(model))
    checkpoint.tidy(out, state)
    data.tidy(out / "data")
    if state is not None:
        checkpoint.export(out, state)


def _data(paths, directory: Path, s: Settings, lines: bool, rank: int, world: int) -> tuple[data.Windows, data.Windows]:
    """The corpus tokenized into ``directory`` (by rank 0, once), as training and validation windows."""
    meta = _on_rank0(lambda: data.prepare(paths, directory, val_fraction=s.val_fraction, seed=s.seed, lines=lines),
                     rank, world, "preparing the corpus")
    windows = {split: data.Windows.open(directory, split, s.context, meta[split + "_tokens"])
               for split in ("train", "val")}
    for split, name in (("train", "training tokens"), ("val", "validation tokens")):
        if len(windows[split]) == 0:
            raise TrainingError(f"the corpus gives {meta[split + '_tokens']} {name}, less than one window of "
                                f"{s.context + 1}; lower --context, raise --val-fraction or give more text")
    return windows["train"], windows["val"]


def _resume(out: Path, identity: dict, model: GPT, optimizer, rank: int) -> dict:
    """The state to go on from: the checkpoint's if ``out`` holds one of this very run, else step 0.
    (Its files' sha256 were checked by rank 0 in ``_open_out``.)"""
    saved = checkpoint.load_state(out, check=False)
    threads = torch.get_num_threads()
    if saved is None:
        return {**identity, "step": 0, "log": [], "schedule_steps": identity["settings"]["steps"], "threads": threads}
    steps, saved_steps = identity["settings"]["steps"], saved["settings"]["steps"]
    saved["settings"] = {**asdict(Settings()), **saved["settings"]}  # a field added since: its default then
    differing = [k for k in identity if _json(saved.get(k)) != _json(identity[k])]
    if differing == ["settings"] and _json({**saved["settings"], "steps": steps}) == _json(identity["settings"]):
        if steps < saved_steps:  # only --steps differs: more is an extension, fewer is refused
            raise TrainingError(f"{out} holds a run of {saved_steps} steps (at step {saved['step']}); --steps "
                                f"{steps} is fewer: give --steps {saved_steps} to resume it, or more to extend it")
        differing = []
    if differing:
        raise TrainingError(f"{out} holds a training run with other {', '.join(differing)}; give the same "
                            "settings to resume it (a larger --steps extends it), or train into a new --out (to "
                            "train a checkpoint further, pass it as --init)")
    if saved.get("threads", threads) != threads and rank == 0:
        print(f"warning: {out} was trained with {saved['threads']} torch threads, this process uses {threads}: "
              "the run goes on, but its losses will not be bit-exact with an uninterrupted run (give --threads "
              f"{saved['threads']} for that)", file=sys.stderr)
    checkpoint.restore(out, saved, model, optimizer, rank)
    return {**identity, "step": saved["step"], "log": saved["log"], "threads": threads,
            "schedule_steps": saved.get("schedule_steps", saved_steps)}


def _json(value) -> str:
    return json.dumps(value, sort_keys=True)


def _check_save_every(save_every: int) -> None:
    if not (is_integer(save_every) and save_every >= 1):
        raise TrainingError(f"bad training settings: save_every must be a positive integer, got {save_every!r}")


def _show(progress, entry: dict) -> None:
    progress.update(1)
    if "sample" in entry and not progress.disable:
        progress.write(f"step {entry['step']} sample: {entry['sample']!r}")
    validation = f" val {entry['val_loss']:.3f}" if "val_loss" in entry else ""
    if "skipped" in entry:
        progress.set_postfix_str(f"step {entry['step']} skipped ({entry['skipped']}){validation}")
    else:
        progress.set_postfix_str(f"loss {entry['loss']:.3f}{validation} {entry['tokens_per_s']:,.0f} tok/s")


def _progress(total: int, done: int, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="step", disable=quiet, dynamic_ncols=True, desc="train")

