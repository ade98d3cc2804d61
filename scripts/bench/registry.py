"""The registry: every concern the bench measures, in the order it runs them and shows them.

To add one: write its module (with ``CONCERN = concern.Concern(...)``), add it below (one line),
and put its thresholds in ``targets.TARGETS``. The command line gets ``--NAME`` / ``--no-NAME``
for it, and its section lands in bench.json and bench.md.
"""
from __future__ import annotations

from . import decode, forward, harvest, load, path_patching, sae, train
from .concern import Concern

CONCERNS: dict[str, Concern] = {c.name: c for c in [
    forward.CONCERN,
    load.CONCERN,
    decode.CONCERN,
    harvest.CONCERN,
    train.CONCERN,
    path_patching.CONCERN,
    sae.CONCERN,
]}
