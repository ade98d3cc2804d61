"""The name mapping between HuggingFace's GPT-2 and minigpt, here and nowhere else, and the plan it gives.

``plan`` maps the tensors a checkpoint holds (names, shapes and dtypes only) onto minigpt's
parameters and says at once, in one CheckpointError, everything that does not fit;
``from_hf_state_dict`` and ``to_hf_state_dict`` convert state dicts held in memory.
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator

import torch

from ..config import GPTConfig
from ..errors import CheckpointError, MiniGPTWarning

# HF name (without "transformer.") -> minigpt name, and whether the tensor is a Conv1D weight,
# which HF stores [in, out] while nn.Linear wants [out, in].
_MODEL_NAMES = [("wte.weight", "embed.weight", False), ("wpe.weight", "pos_embed.weight", False),
                ("ln_f.weight", "ln_f.weight", False), ("ln_f.bias", "ln_f.bias", False)]
_BLOCK_NAMES = [(f"h.{{i}}.{hf}.{kind}", f"blocks.{{i}}.{ours}.{kind}", kind == "weight" and conv1d)
                for hf, ours, conv1d in [("ln_1", "ln1", False), ("attn.c_attn", "attn.qkv", True),
                                         ("attn.c_proj", "attn.out", True), ("ln_2", "ln2", False),
                                         ("mlp.c_fc", "mlp.fc", True), ("mlp.c_proj", "mlp.proj", True)]
                for kind in ("weight", "bias")]


def name_map(n_layer: int) -> dict[str, tuple[str, bool]]:
    """HF name -> (minigpt name, is a Conv1D weight to transpose), for every learned tensor."""
    blocks = [(hf.format(i=i), ours.format(i=i), t) for i in range(n_layer) for hf, ours, t in _BLOCK_NAMES]
    return {hf: (ours, t) for hf, ours, t in _MODEL_NAMES + blocks}


# Buffers in the official files (the causal mask) that carry no learned value.
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# minigpt parameter name -> shape for a config (``GPT.parameter_shapes``): the model says what it holds.
ShapesOf = Callable[[GPTConfig], dict[str, tuple[int, ...]]]
# What a file's header says of one tensor: its shape and dtype.
Header = dict[str, tuple[tuple[int, ...], torch.dtype]]


# ---------------------------------------------------------------------------------------------
# The plan: which file tensor becomes which parameter, checked before anything is read or built


def plan(header: Header, cfg: GPTConfig, shapes_of: ShapesOf) -> tuple[dict[str, tuple[str, bool]], list]:
    """Map the tensors a checkpoint holds onto minigpt's parameters, from names, shapes and dtypes alone.

    Returns ``{minigpt name: (file name, transpose)}`` and the pairs of file names that hold one
    tensor twice (``lm_head.weight`` and ``wte.weight``; a name with and without ``transformer.``),
    which the loader must find equal. Raises one CheckpointError listing every missing,
    unexpected, mis-shaped and non-float tensor, or first, saying that the config and the files
    describe different models (checked by arithmetic, so an absurd config fails at once).
    """
    _check_agreement(header, cfg)
    expected = shapes_of(cfg)
    names = name_map(cfg.n_layer)
    chosen: dict[str, tuple[str, bool]] = {}
    twins: list[tuple[str, str]] = []
    unexpected, misshaped, not_float = [], [], []
    for key, (shape, dtype) in header.items():
        name = key.removeprefix("transformer.")
        if name == "lm_head.weight":
            name = "wte.weight"  # the unembedding: GPT-2 ties it to the token embedding
        if name not in names:
            if not _IGNORED.fullmatch(name):
                unexpected.append(key)
            continue
        ours, conv1d = names[name]
        if ours in chosen:
            twins.append((chosen[ours][0], key))
            continue
        want = expected[ours][::-1] if conv1d else expected[ours]
        if tuple(shape) != want:
            misshaped.append(f"{key}: {tuple(shape)}, expected {want}")
        if not dtype.is_floating_point:
            not_float.append(f"{key}: {dtype}")
        chosen[ours] = key, conv1d
    hf_name = {ours: hf for hf, (ours, _) in names.items()}
    missing = [hf_name[k] for k in expected if k not in chosen]
    problems = [f"{what} {len(items)}: {sep.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                for what, items, sep in (("missing", missing, ", "), ("unexpected", unexpected, ", "),
                                         ("mis-shaped", misshaped, "; "), ("not floating point", not_float, "; "))
                if items]
    if problems:
        raise CheckpointError("the weights do not fit this GPT-2 config (n_layer="
                              f"{cfg.n_layer}, n_embd={cfg.n_embd}, vocab={cfg.vocab_size}): " + " | ".join(problems)
                              + ". Is this a complete GPT-2 checkpoint saved with its own config.json?")
    return chosen, twins


def least_values(cfg: GPTConfig) -> int:
    """At least how many values a GPT-2 of ``cfg`` holds (its tables, LayerNorm and MLP weights), by
    arithmetic alone: an absurd config (n_layer=10**9) is told before anything is built."""
    return (cfg.vocab_size + cfg.n_positions + 2 + cfg.n_layer * 2 * cfg.d_mlp) * cfg.n_embd


def _check_agreement(header: Header, cfg: GPTConfig) -> None:
    """One clear CheckpointError when config.json and the weights describe different models.

    Arithmetic on the header only, before any tensor is listed or built: a config that declares
    more blocks or bigger tables than the files hold (n_layer=10**9, or no weights at all) fails here.
    """
    blocks = {int(m.group(1)) for k in header if (m := re.match(r"(?:transformer\.)?h\.(\d+)\.", k))}
    found = []
    if blocks and max(blocks) + 1 != cfg.n_layer:
        found.append(f"n_layer={cfg.n_layer} but the weights hold blocks h.0..h.{max(blocks)} ({max(blocks) + 1})")
    for table, axis0 in (("wte.weight", "vocab_size"), ("wpe.weight", "n_positions")):
        shape = (header.get(table) or header.get("transformer." + table) or (None,))[0]
        want = (getattr(cfg, axis0), cfg.n_embd)
        if shape is not None and len(shape) == 2 and tuple(shape) != want:
            found.append(f"{axis0}={want[0]}, n_embd={want[1]} but {table} is {list(shape)} ([{axis0}, n_embd])")
    declared = 4 + 12 * cfg.n_layer  # tensors a GPT-2 of this depth has
    values = least_values(cfg)
    held = sum(math.prod(shape) for shape, _ in header.values())
    if not found and (declared > len(header) or values > held):
        found.append(f"n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, vocab_size={cfg.vocab_size}: {declared} tensors "
                     f"of at least {values} values, but the weight files hold {len(header)} tensors of {held}")
    if found:
        raise CheckpointError("config.json and the weights describe different models: the config says "
                              + "; ".join(found) + ". Use the config.json saved with these weights")


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: GPTConfig, shapes_of: ShapesOf) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors in memory (official or ``save_pretrained`` layout) -> minigpt state dict.

    Checks as ``plan`` does (one CheckpointError listing every problem), refuses a tensor held
    twice with different values, and warns (MiniGPTWarning) if a tensor holds NaN or inf.
    ``shapes_of(cfg)`` (``GPT.parameter_shapes``) is asked only once config and weights agree.
    """
    not_tensors = [f"{k}: a {type(v).__name__}, not a tensor" for k, v in hf.items() if not isinstance(v, torch.Tensor)]
    bad_keys = [repr(k) for k in hf if not isinstance(k, str)]
    if not_tensors or bad_keys:
        raise CheckpointError(f"the weights do not fit a GPT-2 checkpoint: not floating point {len(not_tensors)}: "
                              f"{'; '.join(not_tensors[:8])}" if not_tensors else
                              f"the weights do not fit a GPT-2 checkpoint: unexpected {len(bad_keys)}: {bad_keys[:8]}")
    chosen, twins = plan({k: (tuple(v.shape), v.dtype) for k, v in hf.items()}, cfg, shapes_of)
    check_twins((a, hf[a], b, hf[b]) for a, b in twins)
    # A Conv1D weight stays as HF stores it, [in, out]; nn.Linear gets its transposed view, as on loading.
    state = {ours: hf[key].t() if conv1d else hf[key] for ours, (key, conv1d) in chosen.items()}
    warn_if_not_finite([k for k, v in state.items() if not finite(v)])
    return state


def check_twins(pairs: Iterator[tuple[str, torch.Tensor, str, torch.Tensor]]) -> None:
    """Refuse a tensor held under two names unless both hold the same bits (NaN included)."""
    for first, a, second, b in pairs:
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))
        if not same:
            tied = "lm_head.weight" in (first.removeprefix("transformer."), second.removeprefix("transformer."))
            raise CheckpointError(
                "lm_head.weight differs from wte.weight; GPT-2's unembedding is tied and minigpt does not run "
                "untied heads" if tied else f"the checkpoint holds one tensor twice, as {first!r} and {second!r}, "
                "with different values: it is ambiguous which is meant; keep one of them (re-save the checkpoint)")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bits, so that equal NaNs compare equal."""
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t.view({2: torch.int16, 4: torch.int32,
                                                                     8: torch.int64}[t.dtype.itemsize])


def finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or inf, without a temporary the size of ``t``.

    Any NaN or inf makes the sum NaN or inf; a finite sum needs no more. Only when the sum
    overflows are the values looked at one by one, a slice at a time.
    """
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return all(bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(1 << 22))


def warn_if_not_finite(bad: list[str]) -> None:
    """MiniGPTWarning naming the tensors ``bad`` that hold NaN or inf (nothing if there are none)."""
    if bad:
        warnings.warn(f"the checkpoint holds NaN or inf in {len(bad)} tensors ({', '.join(bad[:4])}); every output "
                      "will be NaN. Was the download corrupted, or is the dtype too narrow for the values (float16 "
                      "overflows past 65504)? Fetch the weights again, or load in a wider dtype",
                      MiniGPTWarning, stacklevel=4)


def to_hf_state_dict(state: dict[str, torch.Tensor], n_layer: int, official: bool = True) -> dict[str, torch.Tensor]:
    """minigpt state dict -> HF names: official layout (no prefix) or save_pretrained's (``transformer.``)."""
    prefix = "" if official else "transformer."
    return {prefix + hf: (state[ours].t() if conv1d else state[ours]).contiguous()
            for hf, (ours, conv1d) in name_map(n_layer).items()}
