"""The KV cache: every position's keys and values kept, so that a generation step runs one position.

Without a cache, each new token would rerun the whole sequence. With one, each block's attention
stores the keys and values of the positions it has just computed and reads back those of every
position so far; the new position's query attends over them all. ``model.py`` uses it in two
places: ``GPT.forward`` calls ``extend`` once per call, each ``Attention`` calls ``update``.

Shapes: B batch, H heads, d d_head, n the positions of one forward call, K the positions held.
"""
from __future__ import annotations

import torch

from .errors import InputError


class KVCache:
    """The keys and values of every position run so far, per block, in preallocated buffers.

    One buffer [B, H, capacity, d] per block for keys, one for values. ``extend(n)`` is called once
    per forward call (it returns the positions of the new tokens and what they may see);
    ``update`` is called by each block's attention to store its new keys and values and get those
    of all positions back: the K = ``length`` positions held.

    A padded batch (a ``mask`` given to ``extend``) keeps per row which slots hold real tokens and
    the position of its next token, so each row runs as it would alone.
    """

    def __init__(self, cfg, batch: int, capacity: int, *, dtype: torch.dtype, device: torch.device | str):
        # Separate tensors per block (not views of one): a compiled graph then updates each in place.
        shape = (batch, cfg.n_head, capacity, cfg.d_head)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.capacity = capacity
        self.length = 0  # positions held
        self.slots = torch.arange(capacity, device=device)
        self.real: torch.Tensor | None = None  # [B, capacity]: slots holding real tokens (padded batches)
        self.next_position_id: torch.Tensor | None = None  # [B]: position of each row's next token (padded batches)

    def extend(self, n: int, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids of the n tokens about to run ([n], or [B, n] for a padded batch) and what they
        may see: bool [n, K], or [B, 1, n, K] for a padded batch. ``mask`` [B, n]: True = real token."""
        if self.length + n > self.capacity:
            raise InputError(f"the cache holds {self.capacity} positions and {self.length} are used; "
                             f"{n} more do not fit: make a larger cache")
        slots = self.slots[self.length:self.length + n]
        self.length += n
        keys = self.slots[:self.length]
        if mask is None and self.real is None:
            return slots, slots[:, None] >= keys
        if self.real is None:
            self.real = torch.zeros(mask.shape[0], self.capacity, dtype=torch.bool, device=mask.device)
            self.next_position_id = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        if mask is None:
            mask = torch.ones(self.real.shape[0], n, dtype=torch.bool, device=self.real.device)
        self.real[:, slots] = mask
        position_ids = (self.next_position_id[:, None] + mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        self.next_position_id += mask.sum(dim=-1)
        # As padded_layout in model.py: real keys up to the query; a padding query sees itself.
        visible = (slots[:, None] >= keys) & self.real[:, None, None, :self.length] | (slots[:, None] == keys)
        return position_ids, visible

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys and values [B, H, n, d] of the new positions; return those of all positions [B, H, K, d]."""
        keys, values = self.keys[layer], self.values[layer]
        start = self.length - k.shape[2]
        keys[:, :, start:self.length] = k
        values[:, :, start:self.length] = v
        return keys[:, :, :self.length], values[:, :, :self.length]
