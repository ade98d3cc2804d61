"""Every error minigpt raises on bad input derives from MiniGPTError."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class MiniGPTError(Exception):
    """Base class: bad input, a bad checkpoint, or an edit that broke the rules."""


class TapError(MiniGPTError, KeyError):
    """An unknown tap name, or a pattern that selects no tap."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EditError(MiniGPTError, ValueError):
    """An edit returned something that cannot stand in for the tapped tensor."""


class InputError(MiniGPTError, ValueError):
    """Tokens or text that the model cannot run."""


class CheckpointError(MiniGPTError, ValueError):
    """A config or weight file that is missing, corrupt, or not GPT-2."""


class HubError(MiniGPTError, OSError):
    """The hub cannot give the model: offline with nothing cached, or no such model."""


class HubUnreachableError(HubError):
    """The hub cannot be reached (offline or HF_HUB_OFFLINE=1) and the model is not cached."""


class TokenizerError(MiniGPTError, OSError):
    """GPT-2's BPE vocabulary is not available."""


class MemoryBudgetError(MiniGPTError, MemoryError):
    """The taps asked for would hold more memory than the budget allows."""


class HarvestError(MiniGPTError):
    """A harvest that cannot run or be read: a missing or unreadable corpus, an output directory that
    holds another harvest (or is not writable), settings that cannot work together."""


class TrainingError(MiniGPTError):
    """A training run that cannot start or go on: a corpus too small, settings that cannot work, an
    output directory that holds another run (or a damaged checkpoint of this one)."""


class MiniGPTWarning(UserWarning):
    """Something suspicious that is not an error (e.g. an edit produced NaN)."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> str:
    """'did you mean ...' text for an unknown name (empty if nothing is close)."""
    near = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in near)}?" if near else ""
