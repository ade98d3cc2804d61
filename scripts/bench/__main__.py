"""``python -m scripts.bench``: see cli.py."""
from .cli import main

main()
