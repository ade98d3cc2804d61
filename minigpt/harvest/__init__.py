"""Harvest: a corpus's activations to disk (resumable, on one process or many under torchrun), and back.

    from minigpt import GPT
    from minigpt.harvest import harvest, read

    harvest(GPT.from_pretrained("gpt2"), ["corpus.jsonl"], "blocks.*.resid_post", "acts/", context=128)
    rows = read("acts/", "blocks.6.resid_post")        # memory-mapped; rows.document/.position/.token
    for x, which in rows.batches(4096, seed=0): ...

The modules, in the order data flows: minigpt/corpus.py (files -> documents, shared with training),
windows (documents -> windows -> shards: the plan), runner (the model, the TapCall sink, ranks), guard
(the memory check), storage (the directory, atomic writes, the background writer), records (what is
read back, checked field by field), reader (memory-mapped rows back), cli (``minigpt harvest``).
"""
from ..errors import HarvestError
from .reader import Rows, read
from .runner import harvest

__all__ = ["harvest", "read", "Rows", "HarvestError"]
