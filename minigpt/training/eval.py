"""Evaluation: the loss (``loss_of``, ``evaluate``), what a training run shows besides its checkpoints,
and ``minigpt eval``.

    DIR/metrics.jsonl   one JSON line per step: step, loss, lr, grad_norm, tokens_per_s, mfu
                        (and val_loss, sample where the step evaluated)
    DIR/loss.png        the loss curve, redrawn at every checkpoint

MFU (model FLOPs utilisation) is the tokens per second times the FLOPs a token costs (6 per parameter
for the forward and backward, plus attention's 12 n_layer n_embd context, as PaLM's appendix B counts
it) over the device's stated peak: bf16 dense for the GPUs of ``PEAK_FLOPS``, None elsewhere (a CPU
states no peak). ``evaluate_file``: the loss and perplexity of a model on a file, cut into the windows
training uses (non-overlapping, ``context`` + 1 tokens each).
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import corpus, files
from ..config import END_OF_TEXT, END_OF_TEXT_ID, GPTConfig
from ..errors import InputError, MiniGPTWarning, TrainingError
from ..model import GPT
from .baselines import baselines
from .data import TOKEN_DTYPE, Windows
from .settings import Settings

METRICS_FILE, LOSS_PLOT = "metrics.jsonl", "loss.png"
# Stated peak dense bf16 FLOP/s by CUDA device name (the vendors' data sheets; SXM parts).
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}
SAMPLE_TOKENS, SAMPLE_SEED = 32, 0  # after <|endoftext|> (a document's start), seeded: comparable runs


def loss_of(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
            autocast: bool | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of inputs [B, S] against targets [B, S]; the forward under bf16
    autocast if ``autocast`` (None: on a GPU only). The loss itself is taken in float32."""
    device = inputs.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda" if autocast is None else autocast):
        logits = model(inputs)  # [B, S, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.no_grad()
def evaluate(model: GPT, windows: Windows, s: Settings, rank: int, world: int) -> float:
    """Mean loss over the first ``eval_windows`` validation windows (all ranks together), in eval mode."""
    count = min(s.eval_windows, len(windows))
    was_training = model.training
    model.eval()
    mine = list(range(rank, count, world))
    total = torch.zeros(2, dtype=torch.float64, device=model.unembedding.device)  # loss sum, windows
    for start in range(0, len(mine), s.batch_size):
        chosen = mine[start:start + s.batch_size]
        batch = windows.batch(chosen, model.unembedding.device)
        total += torch.tensor([loss_of(model, *batch, s.autocast(total.device)).item() * len(chosen),
                               len(chosen)], dtype=torch.float64, device=total.device)
    if world > 1:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()




def peak_flops(device: torch.device) -> float | None:
    """The device's stated peak FLOP/s, or None when unknown (any CPU, an unlisted GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)


def flops_per_token(cfg: GPTConfig, n_params: int, context: int) -> float:
    """Training FLOPs per token (forward and backward) of a model of ``n_params`` on windows of ``context``."""
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * context


def mfu(tokens_per_s: float, per_token: float, peak: float | None) -> float | None:
    """The fraction of the stated peak the run reached, or None without a stated peak."""
    return None if peak is None else tokens_per_s * per_token / peak


def costs(model: GPT, context: int) -> tuple[float, float | None]:
    """(FLOPs per token of a training step, the device's stated peak FLOP/s or None): what the MFU is made of."""
    per_token = flops_per_token(model.cfg, sum(p.numel() for p in model.parameters()), context)
    return per_token, peak_flops(model.unembedding.device)


def metrics_line(entry: dict, cost: tuple[float, float | None]) -> str:
    """One line of metrics.jsonl for a log entry: its numbers and the MFU (non-finite numbers as null: strict JSON)."""
    line = {**entry, "mfu": mfu(entry.get("tokens_per_s", 0.0), *cost)}
    return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()}) + "\n"


def rewrite_metrics(out: Path, log: list[dict], cost: tuple[float, float | None]) -> None:
    """metrics.jsonl made anew from the committed log (a resumed run writes the rest again). It is never read:
    whatever stands under its name (a file cut short, a pipe, a link) is replaced, nothing is followed."""
    path = out / METRICS_FILE
    text = "".join(metrics_line(entry, cost) for entry in log)
    try:
        if not text:  # as before the run's first step: no file
            if os.path.lexists(path) and not os.path.isdir(path):
                path.unlink()
            return
        files.write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    except OSError as e:
        raise TrainingError(f"cannot write {path} ({e.strerror or e}); remove what stands there and run again") from e


def append_metrics(out: Path, entry: dict, cost: tuple[float, float | None]) -> None:
    """Add a step's line to metrics.jsonl (made anew by ``rewrite_metrics`` at the start of the run)."""
    with open(out / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(metrics_line(entry, cost))


@torch.no_grad()
def sample_text(model: GPT) -> str:
    """SAMPLE_TOKENS tokens (fewer in a shorter context) after <|endoftext|>, sampled with a seeded generator of its own (the training's
    random state, dropout's, is left as it was), in eval mode; the model's mode is put back."""
    was_training = model.training
    model.eval()
    try:
        new = min(SAMPLE_TOKENS, model.cfg.n_positions - 1)
        ids = model.generate([END_OF_TEXT_ID], new, temperature=1.0, top_k=40, seed=SAMPLE_SEED)
        return model.tokenizer.decode(ids[0, 1:].tolist())
    except InputError as e:  # non-finite logits: the sample must not stop training (the checkpoint check does)
        return f"(no sample: {e})"
    finally:
        model.train(was_training)


def plot_losses(out: Path, log: list[dict]) -> Path | None:
    """DIR/loss.png: the training loss per step and the validation losses; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # matplotlib comes with the minigpt-taps extra; training does not need it
        return None
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    trained = [(e["step"], e["loss"]) for e in log if "loss" in e]
    validated = [(e["step"], e["val_loss"]) for e in log if "val_loss" in e]
    for points, style, label in ((trained, "-", "training loss"), (validated, "o-", "validation loss")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    path = out / LOSS_PLOT
    try:
        files.write_atomically(path, lambda temporary: fig.savefig(temporary, format="png", dpi=80))
    except OSError as e:  # a picture of the log: the run and its checkpoint do not depend on it
        with contextlib.suppress(OSError):
            files.temporary_path(path).unlink(missing_ok=True)
        warnings.warn(f"cannot write {path} ({e.strerror or e}); training goes on without the loss curve",
                      MiniGPTWarning, stacklevel=2)
        return None
    return path


def file_windows(paths: list, context: int, lines: bool = False) -> Windows:
    """The documents of ``paths`` (as training reads them) tokenized, each followed by <|endoftext|>, as windows."""
    from ..tokenizer import gpt2_tokenizer

    encode = gpt2_tokenizer().encode
    ids = [i for doc in corpus.documents(corpus.corpus_files(paths, TrainingError), lines, TrainingError)
           for i in encode(doc.text, allowed_special={END_OF_TEXT}) + [END_OF_TEXT_ID]]
    windows = Windows(np.asarray(ids, dtype=TOKEN_DTYPE), context)
    if len(windows) == 0:
        raise TrainingError(f"the data gives {len(ids)} tokens, less than one window of {context + 1}; give more "
                            "text or a smaller --context")
    return windows


def evaluate_file(model: GPT, paths: list, *, context: int | None = None, batch_size: int = 8, lines: bool = False,
                  train_tokens: np.ndarray | None = None) -> dict:
    """Loss (nats/token) and perplexity of ``model`` over every window of ``paths``.

    ``train_tokens``: the training run's tokens [N]; with them, what counting gets on the same windows
    (``baselines``: uniform, unigram, bigram) is reported beside the model.
    """
    context = context or model.cfg.n_positions
    if not 1 <= context <= model.cfg.n_positions:
        raise TrainingError(f"--context {context} must be in 1..{model.cfg.n_positions} (the model's positions)")
    windows = file_windows(paths, context, lines)
    s = Settings(context=context, batch_size=batch_size, eval_windows=len(windows))
    loss = evaluate(model, windows, s, 0, 1)
    result = {"loss": loss, "perplexity": math.exp(loss), "windows": len(windows), "context": context,
              "tokens": len(windows) * context}
    if train_tokens is not None:
        result["baselines"] = baselines(train_tokens, windows, model.cfg.vocab_size)
    return result
