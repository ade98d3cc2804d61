"""Activation-patching sweeps: the usual grids in one call, several patched rows per forward.

A sweep runs the corrupt input once per site, with one block tap's value at that site put back
from the clean run, and measures ``metric`` on the patched logits. ``patch_positions`` gives the
grid [n_layer, S] over (layer, position) for a residual-stream tap (``resid_pre``, ``attn_delta``,
``mlp_delta``, ...); ``patch_heads`` the grid [n_layer, H] over (layer, head) for a per-head tap
(``attn.z``, ``attn.heads``, ...), each head patched at every position. With ``batch=k`` the
corrupt input is repeated k times and row i patched at its own site, so k sites share a forward;
the numbers are those of the one-site-per-forward loop (``edits.patch``) to float rounding.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from minigpt import GPT
from minigpt.checks import check_choice, check_int
from minigpt.errors import InputError
from minigpt.tap_table import BLOCK_TAPS

from ._common import single_sequence

# logits [B, S, V] -> one number per row [B], e.g. logit_difference(answer, wrong).
Metric = Callable[[torch.Tensor], torch.Tensor]

POSITION_TAPS = tuple(info.name for info in BLOCK_TAPS if info.shape.startswith("B S "))
HEAD_TAPS = tuple(info.name for info in BLOCK_TAPS if info.shape.split()[:3] == ["B", "S", "H"])


def logit_difference(answer: int, wrong: int, position: int = -1) -> Metric:
    """A metric: logits[:, position, answer] - logits[:, position, wrong] -> [B]."""
    answer, wrong = check_int(answer, "answer", 0), check_int(wrong, "wrong", 0)
    position = check_int(position, "position")

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, position, answer] - logits[:, position, wrong]

    return metric


def patch_positions(model: GPT, clean: str | list | torch.Tensor, corrupt: str | list | torch.Tensor,
                    metric: Metric, tap: str = "resid_pre", *, batch: int = 1) -> torch.Tensor:
    """``metric`` with one (layer, position) of ``blocks.L.{tap}`` patched from clean into corrupt: [n_layer, S].

    ``tap``: a block tap shaped [B, S, ...] (``POSITION_TAPS``: resid_pre, attn_delta, mlp_delta, resid_mid,
    resid_post, ...). clean and corrupt: one sequence each, of the same length S. ``batch``: patched
    rows per forward. The grid is on the CPU, in the metric's dtype.
    """
    check_choice(tap, "tap", POSITION_TAPS)
    clean_ids, corrupt_ids = _pair(model, clean, corrupt)
    sites = [(layer, pos) for layer in range(model.cfg.n_layer) for pos in range(clean_ids.shape[1])]
    return _sweep(model, clean_ids, corrupt_ids, metric, tap, sites, axis=1, batch=batch)


def patch_heads(model: GPT, clean: str | list | torch.Tensor, corrupt: str | list | torch.Tensor,
                metric: Metric, tap: str = "attn.z", *, batch: int = 1) -> torch.Tensor:
    """``metric`` with one (layer, head) of ``blocks.L.{tap}`` patched at every position: [n_layer, H].

    ``tap``: a per-head tap [B, S, H, ...] (``HEAD_TAPS``: attn.q, attn.k, attn.v, attn.z, attn.heads).
    Otherwise as ``patch_positions``.
    """
    check_choice(tap, "tap", HEAD_TAPS)
    clean_ids, corrupt_ids = _pair(model, clean, corrupt)
    sites = [(layer, head) for layer in range(model.cfg.n_layer) for head in range(model.cfg.n_head)]
    return _sweep(model, clean_ids, corrupt_ids, metric, tap, sites, axis=2, batch=batch)


def _pair(model: GPT, clean: str | list | torch.Tensor, corrupt: str | list | torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two inputs as ids [1, S] each; InputError unless they have the same length."""
    clean_ids, corrupt_ids = single_sequence(model, clean), single_sequence(model, corrupt)
    if clean_ids.shape != corrupt_ids.shape:
        raise InputError(f"clean and corrupt must have the same number of tokens to patch site by site, got "
                         f"{clean_ids.shape[1]} and {corrupt_ids.shape[1]}; pad or reword one of them")
    return clean_ids, corrupt_ids


def _sweep(model: GPT, clean: torch.Tensor, corrupt: torch.Tensor, metric: Metric, tap: str,
           sites: list[tuple[int, int]], *, axis: int, batch: int) -> torch.Tensor:
    """Run ``sites`` (layer, index along ``axis``) ``batch`` at a time -> the metric grid [n_layer, n_index]."""
    batch = check_int(batch, "batch", 1, way_out="it is the number of patched rows per forward, e.g. 8")
    _, clean_trace = model.run(clean, taps=f"blocks.*.{tap}")
    size = max(index for _, index in sites) + 1
    grid: torch.Tensor | None = None
    for start in range(0, len(sites), batch):
        chunk = sites[start:start + batch]
        edits = {f"blocks.{layer}.{tap}": _patch_rows(clean_trace[tap, layer], chunk, layer, axis)
                 for layer in dict.fromkeys(layer for layer, _ in chunk)}
        logits, _ = model.run(corrupt.repeat(len(chunk), 1), edits=edits)
        values = metric(logits)
        if not isinstance(values, torch.Tensor) or values.shape != (len(chunk),):
            raise InputError(f"the metric must turn logits [B, S, V] into one number per row [B], here "
                             f"[{len(chunk)}]; it returned {getattr(values, 'shape', type(values).__name__)}")
        values = values.detach().cpu()
        if grid is None:
            grid = torch.empty(model.cfg.n_layer, size, dtype=values.dtype)
        for (layer, index), value in zip(chunk, values):
            grid[layer, index] = value
    return grid


def _patch_rows(source: torch.Tensor, chunk: list[tuple[int, int]], layer: int, axis: int
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """An edit of one layer's tap: row i of the batch takes ``source`` [1, ...] at index ``chunk[i][1]``
    along ``axis`` (the position or the head), for the rows whose site is in ``layer``."""
    rows = [row for row, (site_layer, _) in enumerate(chunk) if site_layer == layer]
    indices = [chunk[row][1] for row in rows]

    def edit(x: torch.Tensor) -> torch.Tensor:
        where = torch.tensor(indices, device=x.device)
        # Moving the patched axis next to the batch makes position and head patches one indexing.
        x.movedim(axis, 1)[torch.tensor(rows, device=x.device), where] = source.movedim(axis, 1)[0, where]
        return x

    return edit

