"""Training GPT-2 from scratch: ``train(...)`` and ``minigpt train``; the loop is in loop.py."""
from .loop import Settings, config_of, evaluate, learning_rate, loss_of, make_optimizer, train

__all__ = ["Settings", "train", "config_of", "evaluate", "learning_rate", "loss_of", "make_optimizer"]
