"""What a concern is: one thing the bench measures (a section of bench.json, a table of bench.md).

A concern is a module with ``CONCERN = Concern(...)``, listed in ``registry.CONCERNS``.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Concern:
    name: str     # the option (--name), the key of its section in bench.json, the name of its targets
    help: str     # what it measures, for --help
    default: bool  # whether a plain run includes it
    # Measure: (the parsed options, a logging function) -> the section, a JSON-able dict; the
    # measured values of its targets (targets.TARGETS) go under "target_values", by key.
    run: Callable[[argparse.Namespace, Callable[[str], None]], dict]
    # The section as markdown for bench.md.
    markdown: Callable[[dict], str]
    # Work done in a fresh process (harness.in_fresh_process): request dict -> answer dict.
    child: Callable[[dict], dict] | None = None

