"""An SAE spliced into a run: the tap's value replaced by the SAE's reconstruction of it.

The edit itself is ``minigpt.edits.sae``; ``splice`` is its name here (``probes.sae.splice(sae, tap)``).
"""
from __future__ import annotations

from minigpt.edits import sae as splice

__all__ = ["splice"]
