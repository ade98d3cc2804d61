"""Training GPT-2 from scratch: ``train(...)`` and ``minigpt train``; the loop is in loop.py."""
from ..config import config_of
from .loop import evaluate, learning_rate, loss_of, make_optimizer, train
from .settings import Settings

__all__ = ["Settings", "train", "config_of", "evaluate", "learning_rate", "loss_of", "make_optimizer"]
