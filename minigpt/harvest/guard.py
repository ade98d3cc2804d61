"""The harvest's memory guard: refuse, before anything is written, a harvest whose peak would not fit."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import memory
from ..errors import MemoryBudgetError
from ..memory import HARVEST_BOOKKEEPING_BYTES, fmt_bytes, forward_bytes

if TYPE_CHECKING:
    from ..model import GPT


def check_harvest_memory(model: GPT, batch: int, seq: int, buffer_bytes: int, *, logits: bool) -> None:
    """Refuse a harvest whose peak would not fit in the memory free now.

    Its peak does not grow with the corpus: the forward of one batch (``forward_bytes``) on the
    model's device, plus ``buffer_bytes`` of shard buffers (one being filled, two waiting for the
    disk) and ``HARVEST_BOOKKEEPING_BYTES`` in CPU memory. The weights are already loaded, so they
    are not counted.
    """
    itemsize = model.unembedding.dtype.itemsize
    device = model.unembedding.device
    forward = forward_bytes(model.cfg, batch, seq, itemsize, logits=logits)
    needs = {device: forward} if device.type != "cpu" else {}
    needs[torch.device("cpu")] = buffer_bytes + HARVEST_BOOKKEEPING_BYTES + (forward if device.type == "cpu" else 0)
    for where, total in needs.items():
        free = memory.available_memory(where)  # looked up on the module, so that tests can stand in for it
        if free is not None and total > 0.9 * free:
            raise MemoryBudgetError(
                f"this harvest needs about {fmt_bytes(total)} on {where} (the forward of {batch}x{seq} tokens "
                f"{fmt_bytes(forward)}, shard buffers {fmt_bytes(buffer_bytes)}), more than 90% of the "
                f"{fmt_bytes(free)} free there now; use a smaller --batch-size, --context or --shard-mb")
