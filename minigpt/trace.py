"""What one run recorded: a read-only mapping from tap name to tensor, and its algebra.

The algebra is the residual stream's bookkeeping, each step exact: the stream after block L is
``embed + pos_embed + sum over blocks <= L of (attn_delta + mlp_delta)`` (in eval mode, with the
stream itself unedited), and ``ln_f`` is affine once its scale is frozen at the value it had in this
run, so the logit of a token splits into one term per part plus one for ``ln_f``'s bias
(``ln_f_frozen``). The logit lens reads each state instead through ln_f with that state's own
statistics (``ln_f_own_stats``, ``logit_lens``): the two differ everywhere but at the final residual.
Shapes: P parts, B batch, S sequence, D d_model, H heads.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .checks import check_device, check_floating_dtype, is_integer
from .errors import InputError, TapError, closest

if TYPE_CHECKING:
    from .model import GPT, LayerNorm

# Tokens a logit attribution is about: one id, ids per row [B] or per position [B, S], or a pair
# (a, b) of those for the logit difference a - b.
Tokens = int | Sequence[int] | torch.Tensor | tuple


class Trace(Mapping[str, torch.Tensor]):
    """Read-only mapping from tap name to the tensor recorded in one call."""

    def __init__(self, tensors: dict[str, torch.Tensor], n_layer: int, mask: torch.Tensor | None = None):
        self._tensors = dict(tensors)
        self.n_layer = n_layer
        self.mask = mask  # [B, S] bool, True = real token (a padded batch has False after each row's tokens)

    def __getitem__(self, name: str | tuple[str, int]) -> torch.Tensor:
        """``trace["ln_f"]``, ``trace["blocks.3.resid_post"]``, or for a block tap ``trace["resid_post", 3]``
        (the same tensor; a negative layer counts from the last block)."""
        if isinstance(name, tuple):
            name = self._block_tap(*name) if len(name) == 2 else name
        try:
            return self._tensors[name]
        except (KeyError, TypeError):
            raise TapError(f"tap {name!r} was not recorded in this run{closest(str(name), self._tensors)}; "
                           f"ask for it with run(..., taps=[{name!r}])") from None

    def _block_tap(self, tap: object, layer: object) -> str:
        """(``resid_post``, 3) -> ``blocks.3.resid_post``; TapError for a layer this model lacks."""
        if not isinstance(tap, str) or tap.startswith("blocks.") or not is_integer(layer) \
                or not -self.n_layer <= layer < self.n_layer:
            raise TapError(f"trace[tap, layer] takes a block tap's short name and a block, e.g. trace['resid_post', 3] "
                           f"with blocks 0..{self.n_layer - 1} (negative ones from the end); got ({tap!r}, {layer!r})")
        return f"blocks.{layer % self.n_layer}.{tap}"

    def to(self, device_or_dtype: torch.device | str | torch.dtype) -> Trace:
        """A new Trace, every tensor moved to a device or cast to a floating dtype (this one is unchanged).

        ``mask`` moves with a device and stays bool. The copies stay on the autograd graph (``Tensor.to``).
        """
        if isinstance(device_or_dtype, torch.dtype):
            dtype = check_floating_dtype(device_or_dtype, "Trace.to", "recorded activations are floating tensors; "
                                         "give e.g. torch.float64, or a device such as 'cpu'")
            return Trace({k: v.to(dtype) for k, v in self._tensors.items()}, self.n_layer, self.mask)
        device = check_device(device_or_dtype, "Trace.to")
        mask = None if self.mask is None else self.mask.to(device)
        return Trace({k: v.to(device) for k, v in self._tensors.items()}, self.n_layer, mask)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Trace({', '.join(f'{k}: {tuple(v.shape)}' for k, v in self._tensors.items())})"

    def stack(self, tap: str) -> torch.Tensor:
        """One block tap across all blocks: ``stack('resid_post')`` -> [n_layer, *shape] (e.g. [n_layer, B, S, D])."""
        names = [f"blocks.{layer}.{tap}" for layer in range(self.n_layer)]
        self._require(names, f"blocks.*.{tap}", f"stack({tap!r})")
        return torch.stack([self[name] for name in names])

    def hidden_states(self) -> tuple[torch.Tensor, ...]:
        """What HuggingFace's ``output_hidden_states=True`` returns: n_layer + 1 tensors [B, S, D].

        Block 0's input, the output of every block but the last, then ``ln_f`` (so the last one is
        normalised, unlike ``blocks.{last}.resid_post``). A block's output is ``blocks.L.resid_post``,
        or where that was not recorded ``blocks.L+1.resid_pre``: the same tensor unless an edit
        changed that block input. Record ``taps=['blocks.*.resid_pre', 'ln_f']`` (or ``resid_post``).
        """
        return (*self._stream(self.n_layer - 1, "hidden_states()", ["blocks.*.resid_pre", "ln_f"], also=["ln_f"]),
                self["ln_f"])

    def accumulated_residual(self) -> torch.Tensor:
        """The residual stream as it grows: [n_layer + 1, B, S, D].

        Index 0 is block 0's input (embed + pos_embed), index L + 1 block L's output; the last is what
        ``ln_f`` normalises. A block's output is taken as in ``hidden_states``. Record
        ``taps=['blocks.*.resid_pre', 'blocks.{last}.resid_post']`` (or ``blocks.0.resid_pre`` and
        ``blocks.*.resid_post``).
        """
        record = ["blocks.*.resid_pre", f"blocks.{self.n_layer - 1}.resid_post"]
        return torch.stack(self._stream(self.n_layer, "accumulated_residual()", record))

    def decomposed_residual(self, heads: bool = False) -> tuple[torch.Tensor, list[str]]:
        """The last block's output split into what wrote it: (parts [P, B, S, D], labels, P of them).

        In the model's order: ``embed``, ``pos_embed``, then per block ``blocks.L.attn_delta`` and
        ``blocks.L.mlp_delta``. Added one after the other in this order, the parts give
        ``blocks.{last}.resid_post`` bit for bit (``parts.sum(0)`` to float rounding), for a run in
        eval mode whose residual stream (resid_pre, resid_mid, resid_post) was not edited.
        ``heads=True`` splits each attn_delta into its heads' writes ``blocks.L.attn.heads[h]`` and
        ``blocks.L.attn.out.bias``, which is attn_delta minus the heads' sum (the output bias, to float
        rounding), so that each block's split sums to its attn_delta to float rounding.
        Needs taps embed, pos_embed, blocks.*.attn_delta, blocks.*.mlp_delta (and blocks.*.attn.heads).
        """
        kinds = ["attn_delta", "mlp_delta"] + (["attn.heads"] if heads else [])
        record = ["embed", "pos_embed"] + [f"blocks.*.{kind}" for kind in kinds]
        self._require(["embed", "pos_embed"] + [f"blocks.{layer}.{kind}" for layer in range(self.n_layer)
                                                for kind in kinds], record, f"decomposed_residual(heads={heads})")
        parts, labels = [self["embed"], self["pos_embed"]], ["embed", "pos_embed"]
        for layer in range(self.n_layer):
            p = f"blocks.{layer}."
            if heads:
                writes = self[p + "attn.heads"]  # [B, S, H, D]
                parts += [*writes.unbind(dim=2), self[p + "attn_delta"] - writes.sum(dim=2)]
                labels += [f"{p}attn.heads[{h}]" for h in range(writes.shape[2])] + [p + "attn.out.bias"]
            else:
                parts.append(self[p + "attn_delta"])
                labels.append(p + "attn_delta")
            parts.append(self[p + "mlp_delta"])
            labels.append(p + "mlp_delta")
        return torch.stack(parts), labels

    def ln_f_frozen(self, stack: torch.Tensor, model: GPT | LayerNorm, *, bias: bool = False) -> torch.Tensor:
        """ln_f on residual-stream vectors, its scale frozen at this run's: [..., B, S, D] -> [..., B, S, D].

        Each vector is centred, then multiplied by the recorded ``ln_f.scale`` [B, S, 1] (1/sqrt(var + eps)
        of the whole residual at that position) and by ln_f's weight. That map is linear: on parts
        that sum to the final residual (``decomposed_residual``) the results sum to ``trace['ln_f']``
        minus ln_f's bias, to float rounding. ``bias=True`` adds the bias (for a whole residual, not
        parts). ``model``: the model or its ``ln_f``. Needs the tap ``ln_f.scale``.
        For direct logit attribution, not for reading an earlier state (a logit lens): the final
        residual's scale is wrong for an earlier state, by tens of logits on GPT-2; ``ln_f_own_stats``
        normalises each vector with its own statistics.
        """
        self._require(["ln_f.scale"], "ln_f.scale", "ln_f_frozen")
        scale = self["ln_f.scale"]
        if stack.dim() < 3 or stack.shape[-3:-1] != scale.shape[:2]:
            raise InputError(f"ln_f_frozen takes residual vectors [..., B, S, D] with (B, S) = {tuple(scale.shape[:2])} "
                             f"as this trace recorded them, got shape {tuple(stack.shape)}")
        ln = getattr(model, "ln_f", model)
        centred = stack - stack.mean(dim=-1, keepdim=True)
        normed = centred * scale.to(stack) * _parameter(ln.weight, stack)
        return normed + _parameter(ln.bias, stack) if bias else normed

    @staticmethod
    def ln_f_own_stats(stack: torch.Tensor, model: GPT | LayerNorm) -> torch.Tensor:
        """ln_f as the model applies it, each vector with its OWN mean and variance: [..., D] -> [..., D].

        The logit lens's normalisation (not linear; includes ln_f's bias). Computed by the model's
        ``ln_f`` kernel in its dtype and on its device, returned in ``stack``'s dtype and device: on
        the final residual it gives ``trace['ln_f']`` bit for bit (to float rounding where the run
        recorded ``ln_f.scale``, which computes ln_f in the open). Needs no tap. Contrast ``ln_f_frozen``
        (this run's recorded scale, linear: direct logit attribution). ``model``: the model or its ``ln_f``.
        """
        ln = getattr(model, "ln_f", model)
        x = stack.to(ln.weight.device, ln.weight.dtype)
        normed = F.layer_norm(x, ln.normalized_shape, _parameter(ln.weight, x), _parameter(ln.bias, x), ln.eps)
        return normed.to(stack)

    def logit_lens(self, model: GPT, tokens: Tokens | None = None) -> torch.Tensor:
        """The logit lens: each residual state through ``ln_f_own_stats`` and the unembedding.

        -> [n_layer + 1, B, S, V] (index 0 the embeddings, L + 1 block L's output; the last is the
        model's logits to float rounding), in the trace's dtype. With ``tokens`` (as in
        ``logit_attribution``: an id, ids [B] or [B, S], or a pair (a, b) for a - b) only their logits:
        [n_layer + 1, B, S], without the [.., V] product (which takes L * B * S * V values).
        Needs the taps of ``accumulated_residual``.
        """
        normed = self.ln_f_own_stats(self.accumulated_residual(), model)
        if tokens is not None:
            return (normed * self._unembedding_of(model, tokens, normed)).sum(dim=-1)
        return F.linear(normed, _parameter(model.unembedding, normed))  # the model's own product

    def apply_ln_f(self, stack: torch.Tensor, model: GPT | LayerNorm, *, bias: bool = False) -> torch.Tensor:
        """The old name of ``ln_f_frozen`` (deprecated)."""
        warnings.warn("Trace.apply_ln_f is renamed Trace.ln_f_frozen (ln_f with this run's recorded scale)",
                      DeprecationWarning, stacklevel=2)
        return self.ln_f_frozen(stack, model, bias=bias)

    def logit_attribution(self, stack: torch.Tensor, model: GPT, tokens: Tokens) -> torch.Tensor:
        """Each vector's direct contribution to a logit: [..., B, S, D] -> [..., B, S].

        ``ln_f_frozen(stack)`` dotted with the unembedding row of ``tokens``: one id, ids [B] (one per
        row) or [B, S], or a pair ``(a, b)`` of those for the logit difference a - b. On the parts of
        ``decomposed_residual``, the contributions plus ``ln_f_bias_attribution(model, tokens)`` sum
        to the logit (or the difference) to float rounding: direct logit attribution. Needs ``ln_f.scale``.
        """
        normed = self.ln_f_frozen(stack, model)
        return (normed * self._unembedding_of(model, tokens, normed)).sum(dim=-1)

    def ln_f_bias_attribution(self, model: GPT, tokens: Tokens) -> torch.Tensor:
        """The part of the logit that no residual vector writes, ln_f's bias . W_U[token]: [B, S].

        Added to ``logit_attribution``'s contributions of the whole residual, it completes the logit.
        """
        self._require(["ln_f.scale"], "ln_f.scale", "ln_f_bias_attribution")
        like = self["ln_f.scale"]  # [B, S, 1]: the positions this trace holds
        direction = self._unembedding_of(model, tokens, like)
        return (_parameter(model.ln_f.bias, like) * direction).sum(dim=-1).expand(like.shape[:2])

    def _unembedding_of(self, model: GPT, tokens: Tokens, like: torch.Tensor) -> torch.Tensor:
        """W_U rows for ``tokens``, broadcastable to [B, S, D]: [D], [B, 1, D] or [B, S, D]; a pair: the difference."""
        if isinstance(tokens, tuple):
            if len(tokens) != 2:
                raise InputError(f"a tuple of tokens is a pair (a, b) for the logit difference a - b; got "
                                 f"{len(tokens)} items (give ids per row as a list or a tensor)")
            return self._unembedding_of(model, tokens[0], like) - self._unembedding_of(model, tokens[1], like)
        w_u = _parameter(model.unembedding, like)  # [V, D]
        ids = torch.as_tensor(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)
        batch, seq = like.shape[-3:-1]
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex() or (
                ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < w_u.shape[0]):
            raise InputError(f"tokens must be integer ids in [0, {w_u.shape[0]}), got {tokens!r}")
        if ids.dim() == 0:
            return w_u[ids]
        if ids.shape == (batch,):
            return w_u[ids][:, None]
        if ids.shape == (batch, seq):
            return w_u[ids]
        raise InputError(f"tokens of shape {tuple(ids.shape)} do not fit this trace's (B, S) = ({batch}, {seq}); "
                         "give one id, ids [B] (one per row), ids [B, S], or a pair (a, b) of those")

    def _stream(self, blocks: int, what: str, record: list[str], also: Sequence[str] = ()) -> list[torch.Tensor]:
        """Block 0's input, then the outputs of the first ``blocks`` blocks (TapError naming what to record)."""
        options = [["blocks.0.resid_pre"]] + [[f"blocks.{layer}.resid_post", f"blocks.{layer + 1}.resid_pre"]
                                              for layer in range(blocks)]
        chosen = []
        for names in options:
            names = [n for n in names if n != f"blocks.{self.n_layer}.resid_pre"]  # past the last block
            chosen.append(next((n for n in names if n in self._tensors), names[-1]))
        self._require([*chosen, *also], record, what)
        return [self[name] for name in chosen]

    def _require(self, names: list[str], record: str | list[str], what: str) -> None:
        """TapError naming the taps ``what`` needs that this run did not record, and what to ask for."""
        missing = [name for name in names if name not in self._tensors]
        if missing:
            raise TapError(f"{what} needs taps {missing[:3]}{'...' if len(missing) > 3 else ''}, not recorded in this "
                           f"run; run with taps={record!r}")


def _parameter(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A model parameter in ``like``'s dtype and device, on the autograd graph only if ``like`` is."""
    return (weight if like.requires_grad else weight.detach()).to(like)
