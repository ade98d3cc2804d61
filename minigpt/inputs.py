"""Checking what callers pass to the model: token ids and run()'s recording options."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .config import END_OF_TEXT, GPTConfig, is_integer
from .errors import InputError


def as_tokens(inputs: str | Sequence | torch.Tensor, cfg: GPTConfig, device: torch.device,
              tokenizer: Callable) -> torch.Tensor:
    """Text, ids or a tensor -> int64 tensor [B, S] on ``device``, of ids this model can look up.

    Checks the form (a dense integer tensor of two axes, not empty) and, for text, that its ids
    fit the vocabulary; ``check_values`` (run by the forward pass) checks the ids themselves.
    ``tokenizer()`` gives the encoding, asked for only when ``inputs`` is text.
    """
    from_text = isinstance(inputs, str)
    if from_text:
        if not inputs:
            raise InputError("empty text: give at least one character (or token id)")
        inputs = [tokenizer().encode(inputs, allowed_special={END_OF_TEXT})]
    if not isinstance(inputs, torch.Tensor):
        try:
            inputs = torch.tensor(inputs)
        except Exception as e:  # torch raises TypeError, ValueError, RuntimeError or OverflowError here
            texts = isinstance(inputs, (list, tuple)) and any(isinstance(i, str) for i in inputs)
            hint = ("; for several texts, encode each with model.tokenizer.encode and pass equal-length "
                    "lists" if texts else "")
            raise InputError(f"cannot make a token tensor from {type(inputs).__name__} ({e}); give "
                             f"text, a list of ints, or a list of equal-length lists of ints{hint}") from None
    if inputs.dim() == 1:
        inputs = inputs.unsqueeze(0)
    if _integral(inputs.dtype) and inputs.dtype != torch.long and inputs.layout == torch.strided \
            and inputs.device.type != "meta":
        inputs = inputs.long()  # uint8 ... uint64 ids: nn.Embedding takes only int64/int32
    if from_text and int(inputs.max()) >= cfg.vocab_size:
        raise InputError(f"the text encodes to GPT-2 token id {int(inputs.max())}, but this model's vocabulary "
                         f"has only {cfg.vocab_size} entries; pass token ids below {cfg.vocab_size}")
    check_form(inputs)
    return inputs.to(device=device, dtype=torch.long)


# Integer dtypes nn.Embedding accepts as indices; model.run converts every other integer dtype.
INDEX_DTYPES = (torch.int64, torch.int32)


def _integral(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_tokens(tokens: torch.Tensor, cfg: GPTConfig) -> None:
    """Raise InputError unless ``tokens`` is an int64/int32 tensor [B, S] of ids the model can run."""
    check_form(tokens)
    check_values(tokens, cfg)


def check_form(tokens: torch.Tensor) -> None:
    """Raise InputError unless ``tokens`` is a dense, non-empty int64/int32 tensor [B, S]."""
    if not isinstance(tokens, torch.Tensor):
        raise InputError(f"tokens must be a tensor, got {type(tokens).__name__}; model(...) takes an int64 "
                         "tensor [batch, seq], model.run(...) also takes text and lists of ids")
    if tokens.layout != torch.strided or tokens.device.type == "meta":
        what = "on the meta device (shapes only, no values)" if tokens.device.type == "meta" else f"{tokens.layout}"
        raise InputError(f"tokens must be a dense tensor holding values, got one {what}; pass real ids "
                         "(e.g. tokens.to_dense() or a tensor on the model's device)")
    if tokens.numel() == 0:
        raise InputError(f"empty input (shape {tuple(tokens.shape)}): give at least one token")
    if tokens.dtype not in INDEX_DTYPES:
        if _integral(tokens.dtype):
            raise InputError(f"token ids must be int64 (or int32), got a {tokens.dtype} tensor; convert with "
                             "tokens.long() (model.run converts integer tensors itself)")
        raise InputError(f"token ids must be integers, got a {tokens.dtype} tensor; if it holds whole ids, "
                         "convert with tokens.round().long()")
    if tokens.dim() != 2:
        raise InputError(f"tokens must be shaped [batch, seq], got shape {tuple(tokens.shape)}; "
                         "give one sequence [seq] to model.run, or a batch [batch, seq]")


def check_values(tokens: torch.Tensor, cfg: GPTConfig) -> None:
    """Raise InputError unless the ids of ``tokens`` [B, S] fit the context and the vocabulary."""
    if tokens.shape[1] > cfg.n_positions:
        raise InputError(f"{tokens.shape[1]} tokens is longer than the context of {cfg.n_positions}; "
                         f"split the input or keep the last {cfg.n_positions} tokens (tokens[:, -{cfg.n_positions}:])")
    if not torch.compiler.is_compiling():
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= cfg.vocab_size:
            bad = low if low < 0 else high
            where = tuple((tokens == bad).nonzero()[0].tolist())
            raise InputError(f"token id {bad} (at [batch, position] {list(where)}) is outside the vocabulary "
                             f"[0, {cfg.vocab_size}) of this model; were these ids made by another tokenizer?")


def check_keep_options(grad: bool, to: torch.device | str | None, dtype: torch.dtype | None,
                       positions: slice | list[int] | None, seq: int) -> None:
    """Raise InputError unless run()'s grad/to/dtype/positions are usable for a ``seq``-token run."""
    if not isinstance(grad, bool):
        raise InputError(f"grad must be True or False, got {grad!r}")
    if to is not None:
        try:
            torch.device(to)
        except (RuntimeError, TypeError) as e:
            raise InputError(f"to={to!r} is not a device ({e}); use e.g. 'cpu' or 'cuda:0'") from None
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"dtype={dtype!r}: recorded activations are kept in a floating dtype, e.g. "
                         "torch.float16 or torch.bfloat16 (None keeps the model's)")
    if positions is None:
        return
    if isinstance(positions, slice):
        try:
            kept = range(seq)[positions]
        except (TypeError, ValueError) as e:
            raise InputError(f"positions={positions!r} is not a usable slice ({e})") from None
    elif isinstance(positions, (list, tuple, range)) and all(
            is_integer(p) for p in positions):
        kept = positions
        wrong = [p for p in positions if not -seq <= p < seq]
        if wrong:
            raise InputError(f"positions {wrong[:5]} do not exist in a {seq}-token input; give positions in "
                             f"[{-seq}, {seq}) (negative ones count from the end)")
    else:
        raise InputError(f"positions must be a slice or a list of ints (e.g. [-1] for the last token), "
                         f"got {positions!r}")
    if len(kept) == 0:
        raise InputError(f"positions={positions!r} keeps no position of a {seq}-token input; "
                         "leave positions=None to keep them all")
