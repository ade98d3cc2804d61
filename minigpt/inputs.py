"""Checking what callers pass to the model: token ids, masks, seeds and where weights go.

run()'s recording options are checked where they live, beside ``taps.Keep``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .checks import check_bool, check_device, check_floating_dtype, check_int, is_integer
from .config import END_OF_TEXT, END_OF_TEXT_ID, GPTConfig
from .errors import InputError


def as_tokens(inputs: str | Sequence | torch.Tensor, cfg: GPTConfig, device: torch.device, tokenizer: Callable, *,
              attention_mask: torch.Tensor | Sequence | None = None, prepend_bos: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text, ids, a batch of either, or a tensor -> (int64 ids [B, S] on ``device``, mask [B, S] or None).

    Sequences of different lengths (texts, id lists, 1-D tensors) are padded on the right, each
    row's real tokens first, and the mask (True = real token) says which are real; ``attention_mask``
    gives one for ``inputs`` of equal lengths instead (0 = padding, anywhere). The mask is None
    when every token is real. ``prepend_bos`` puts ``<|endoftext|>`` before each text. Checks the
    form (a dense integer tensor of two axes, not empty) and, for text, that its ids fit the
    vocabulary; ``check_values`` (run by the forward pass) checks the ids themselves.
    ``tokenizer()`` gives the encoding, asked for only when ``inputs`` is text.
    """
    check_bool(prepend_bos, "prepend_bos")
    rows, from_text = _rows(inputs, tokenizer, prepend_bos)
    mask = None
    if rows is not None:
        lengths = [len(r) if isinstance(r, (list, tuple)) else 0 for r in rows]
        if len(set(lengths)) > 1 and all(isinstance(r, (list, tuple)) for r in rows):  # a ragged batch: pad each row on the right
            if attention_mask is not None:
                raise InputError("attention_mask is for a batch of equal-length rows; these rows have lengths "
                                 f"{lengths[:8]}: drop attention_mask (the padding mask is made for you)")
            if 0 in lengths:
                raise InputError(f"row {lengths.index(0)} of the batch is empty: give every row at least one token")
            pad = END_OF_TEXT_ID if END_OF_TEXT_ID < cfg.vocab_size else 0
            mask = torch.tensor([[True] * n + [False] * (max(lengths) - n) for n in lengths])
            rows = [list(r) + [pad] * (max(lengths) - len(r)) for r in rows]
        inputs = _to_tensor(rows, type(inputs).__name__)
    if inputs.dim() == 1:
        inputs = inputs.unsqueeze(0)
    if _integral(inputs.dtype) and inputs.dtype != torch.long and inputs.layout == torch.strided \
            and inputs.device.type != "meta":
        inputs = inputs.long()  # uint8 ... uint64 ids: nn.Embedding takes only int64/int32
    if from_text and int(inputs.max()) >= cfg.vocab_size:
        raise InputError(f"the text encodes to GPT-2 token id {int(inputs.max())}, but this model's vocabulary "
                         f"has only {cfg.vocab_size} entries; pass token ids below {cfg.vocab_size}")
    check_form(inputs)
    if attention_mask is not None:
        mask = check_mask(attention_mask, tuple(inputs.shape), (inputs.device, torch.device(device)))
    return inputs.to(device=device, dtype=torch.long), None if mask is None else mask.to(device)


def _rows(inputs: object, tokenizer: Callable, prepend_bos: bool) -> tuple[list | None, bool]:
    """The sequences of ``inputs`` as lists (texts encoded), or None for a tensor; and whether it was text."""
    texts = [inputs] if isinstance(inputs, str) else inputs
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts):
        if not all(texts):
            raise InputError("empty text: give at least one character (or token id) in every text")
        bos = [END_OF_TEXT_ID] if prepend_bos else []
        return [bos + tokenizer().encode(t, allowed_special={END_OF_TEXT}) for t in texts], True
    if prepend_bos:
        raise InputError("prepend_bos=True puts <|endoftext|> before text; these inputs are ids: add it "
                         f"yourself (id {END_OF_TEXT_ID}) or pass text")
    if isinstance(inputs, torch.Tensor):
        return None, False
    if isinstance(inputs, (list, tuple)) and inputs and all(
            isinstance(r, (list, tuple)) or (isinstance(r, torch.Tensor) and r.dim() == 1) for r in inputs):
        return [r.tolist() if isinstance(r, torch.Tensor) else r for r in inputs], False
    return [inputs], False  # one sequence of ids (or something _to_tensor will refuse)


def _to_tensor(rows: list, what: str) -> torch.Tensor:
    """Rows of equal length -> a tensor [B, S] (one row stays [1, S]); InputError if they are not ids."""
    try:
        tensor = torch.tensor(rows)
    except Exception as e:  # torch raises TypeError, ValueError, RuntimeError or OverflowError here
        mixed = any(isinstance(i, str) for r in rows if isinstance(r, (list, tuple)) for i in r)
        hint = "; a batch of texts is a list of strings only" if mixed else ""
        raise InputError(f"cannot make a token tensor from {what} ({e}); give text, a list of texts, a "
                         f"list of ints, or a list of lists of ints (of any lengths){hint}") from None
    return tensor


def check_mask(mask: torch.Tensor | Sequence, shape: tuple[int, ...],
               devices: Sequence[torch.device] = ()) -> torch.Tensor | None:
    """An HF-style attention mask [B, S] (1/True = real token, 0/False = padding) -> bool, or None if all real.

    Refused (InputError): a mask that is not dense, not on one of ``devices`` (the tokens' and the
    model's; any if empty), not of ``shape``, holding anything but 0 and 1 (a float 0.5, NaN), or
    with a row of padding only (there is no token to continue or to read the output at).
    """
    try:
        mask = torch.as_tensor(mask)
    except Exception as e:
        raise InputError(f"attention_mask must be a tensor [batch, seq] of 0s and 1s ({e})") from None
    if mask.layout != torch.strided or mask.device.type == "meta":
        what = "on the meta device (no values)" if mask.device.type == "meta" else f"of layout {mask.layout}"
        raise InputError(f"attention_mask must be a dense tensor of 0s and 1s, got one {what}; pass "
                         "mask.to_dense() (on the tokens' device)")
    if devices and mask.device not in [torch.device(d) for d in devices]:
        raise InputError(f"attention_mask is on {mask.device}, the tokens on {devices[0]} and the model on "
                         f"{devices[-1]}; move it: attention_mask.to({str(devices[-1])!r})")
    if mask.dim() == 1 and shape[0] == 1:
        mask = mask[None]  # one sequence [S], as the tokens may be
    if tuple(mask.shape) != shape:
        raise InputError(f"attention_mask has shape {tuple(mask.shape)} but the tokens have shape {shape}; "
                         "give one 0/1 per token")
    if mask.dtype.is_complex or not ((mask == 0) | (mask == 1)).all():
        bad = "" if mask.dtype.is_complex else f", got {mask[(mask != 0) & (mask != 1)][0].item()!r}"
        raise InputError(f"attention_mask must hold only 0 (padding) and 1 (real token), or False and True{bad}")
    mask = mask.bool()
    if not mask.any(dim=-1).all():
        empty = (~mask.any(dim=-1)).nonzero()[0].item()
        raise InputError(f"attention_mask row {empty} has no real token; every row needs at least one")
    return None if mask.all() else mask


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


def tokens(model, inputs: str | Sequence | torch.Tensor, *, prepend_bos: bool = False,
           return_mask: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``model.tokens(...)``: text, ids, a batch of either (any lengths) or a tensor -> checked int64 ids
    [B, S] on the model's device.

    Rows of different lengths are padded on the right; ``return_mask=True`` also returns the mask
    [B, S] (True = real token). ``prepend_bos`` puts ``<|endoftext|>`` before each text (off by default).
    """
    check_bool(return_mask, "return_mask")
    ids, mask = as_tokens(inputs, model.cfg, model.unembedding.device, lambda: model.tokenizer,
                          prepend_bos=prepend_bos)
    check_values(ids, model.cfg)
    if not return_mask:
        return ids
    return ids, mask if mask is not None else torch.ones_like(ids, dtype=torch.bool)


def check_seed(seed: object, what: str = "seed") -> int:
    """``seed`` as a Python int (a torch.Generator refuses NumPy's), if it is an integer a generator takes;
    else InputError."""
    return check_int(seed, what, 0, 2**63 - 1)


def str_tokens(model, inputs: str | Sequence | torch.Tensor, *, prepend_bos: bool = False) -> list[str] | list[list[str]]:
    """``model.str_tokens(...)``: each token as its text, e.g. ``"Hi there"`` -> ``['Hi', ' there']``.

    One text or one id sequence -> a list; a batch -> a list per row (real tokens only). A token
    that is only part of a character (a byte of UTF-8) shows as the replacement character.
    """
    ids, mask = model.tokens(inputs, prepend_bos=prepend_bos, return_mask=True)
    rows = [[model.tokenizer.decode([i]) for i in row[real].tolist()] for row, real in zip(ids, mask)]
    one = isinstance(inputs, str) or (isinstance(inputs, torch.Tensor) and inputs.dim() == 1) or (
        isinstance(inputs, (list, tuple)) and all(is_integer(i) for i in inputs))
    return rows[0] if one else rows


def token_id(model, text: str) -> int:
    """``model.token_id(" Paris")``: the id of a text that is exactly one token (InputError otherwise)."""
    if not isinstance(text, str) or not text:
        raise InputError(f"token_id takes a non-empty text, got {text!r}")
    ids = model.tokenizer.encode(text, allowed_special={END_OF_TEXT})
    if len(ids) == 1 and ids[0] >= model.cfg.vocab_size:  # as model.tokens refuses it: the model has no such row
        raise InputError(f"{text!r} is GPT-2 token id {ids[0]}, but this model's vocabulary has only "
                         f"{model.cfg.vocab_size} entries; choose a text whose id is below {model.cfg.vocab_size}")
    if len(ids) == 1:
        return ids[0]
    pieces = [model.tokenizer.decode([i]) for i in ids]
    hint = ""
    if not text.startswith(" ") and len(model.tokenizer.encode(" " + text)) == 1:
        hint = f"; {' ' + text!r} (with a leading space, as after another word) is one token"
    raise InputError(f"{text!r} is {len(ids)} tokens, {pieces}, not one{hint}")


def check_placement(dtype: object, device: object) -> torch.device:
    """Raise InputError unless ``dtype`` is a floating torch dtype and ``device`` one this machine has."""
    check_floating_dtype(dtype, "dtype", "weights are kept in torch.float32, torch.bfloat16, torch.float16 or "
                         "torch.float64", min_bytes=2)
    where = check_device(device)
    if where.type == "meta":
        raise InputError("device='meta' holds no values; load onto 'cpu' or a GPU")
    if where.type == "cuda" and not (torch.cuda.is_available() and (where.index or 0) < torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} GPUs" if torch.cuda.is_available() else "no usable GPU"
        raise InputError(f"device={device!r}, but this machine has {have} (torch.cuda.is_available() is "
                         f"{torch.cuda.is_available()}); use 'cpu'")
    if where.type not in ("cpu", "cuda") and not hasattr(torch, where.type):
        raise InputError(f"device={device!r}: this PyTorch has no {where.type!r} backend; use 'cpu'")
    return where
