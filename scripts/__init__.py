"""Helper commands run from the repository root (``python -m scripts.bench``); not part of the installed package."""
