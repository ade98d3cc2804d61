"""``python -m minigpt`` (and ``torchrun -m minigpt``): the ``minigpt`` command."""
from .cli import main

raise SystemExit(main())
