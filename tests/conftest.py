"""Shared pytest set-up: hypothesis profiles, torch threads, markers, the headless browser.

Profiles (choose with the environment variable HYPOTHESIS_PROFILE, default "ci"):
  ci   derandomized (the same examples every run), few examples, no deadline: fast and repeatable.
  dev  many random examples, for hunting bugs locally (HYPOTHESIS_PROFILE=dev pytest tests/).
"""
from __future__ import annotations

import os
import shutil

import pytest
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


# Browser tests drive the system's Chromium with Playwright (``pip install playwright``, in the dev extra;
# never ``playwright install``): Debian's chromium-headless-shell or chromium, or MINIGPT_BROWSER.
BROWSERS = ["chromium-headless-shell", "chromium", "chromium-browser"]
# A browser that starts quickly and reaches for nothing outside the page.
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium for the module's tests; skipped, saying which is missing, without one."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                   "playwright; the tests use the system's chromium, no `playwright install`)")
    found = [shutil.which(name) for name in [os.environ.get("MINIGPT_BROWSER", ""), *BROWSERS] if name]
    path = next((f for f in found if f), None)
    if path is None:
        pytest.skip("no chromium found: apt-get install chromium (or chromium-headless-shell), or set MINIGPT_BROWSER")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=BROWSER_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()
