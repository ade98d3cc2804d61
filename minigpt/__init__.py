"""minigpt: GPT-2 by hand in plain PyTorch, with named taps and edits, equal to HuggingFace's."""
from . import edits
from .config import OFFICIAL, GPTConfig
from .errors import (CheckpointError, EditError, HarvestError, HubError, HubUnreachableError, InputError, MemoryBudgetError, MiniGPTError,
                     MiniGPTWarning, TapError, TokenizerError, TrainingError)
from .model import GPT
from .tap_table import describe, tap_names
from .trace import Trace

__all__ = ["GPT", "GPTConfig", "OFFICIAL", "Trace", "tap_names", "describe", "edits", "MiniGPTError",
           "TapError", "EditError", "InputError", "CheckpointError", "HubError", "HubUnreachableError", "TokenizerError",
           "MemoryBudgetError", "HarvestError", "TrainingError", "MiniGPTWarning"]
