"""Shared pytest set-up: hypothesis profiles, torch threads, markers.

Profiles (choose with the environment variable HYPOTHESIS_PROFILE, default "ci"):
  ci   derandomized (the same examples every run), few examples, no deadline: fast and repeatable.
  dev  many random examples, for hunting bugs locally (HYPOTHESIS_PROFILE=dev pytest tests/).
"""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]

settings.register_profile("ci", derandomize=True, max_examples=15, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("dev", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Small models run fastest on few threads, and several test processes may share the machine.
torch.set_num_threads(int(os.environ.get("MINIGPT_TEST_THREADS", 1)))


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: a test that takes more than a few seconds (deselect with -m 'not slow')")
