"""The report page in a real browser: it reflows on a phone's width, loads every figure, shows each at
its natural size at most, and logs no error.

Driven by Playwright (``pip install playwright``, in the ``dev`` extra) with the system's Chromium
(Debian: ``apt-get install chromium``, or ``chromium-headless-shell``); ``playwright install`` is not
needed. Skipped, saying which is missing, where either is. ``MINIGPT_BROWSER`` names another Chromium.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from minigpt import GPT, GPTConfig

pytest.importorskip("matplotlib")
pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright; "
                    "the test uses the system's chromium, no `playwright install`)")
from probes.report import build_report  # noqa: E402  (needs matplotlib)

TEXT = "The cat sat on the mat, and then it looked at the dog."
PHONE, DESKTOP = 375, 1280


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    build_report(GPT.random(GPTConfig(n_embd=32, n_layer=3, n_head=4, n_positions=64), seed=3), TEXT, out)
    return out / "index.html"


# Each image: where it comes from, whether it loaded, its natural size, its size on the page (the picture
# itself, inside its 1 px border) and the width its box leaves it.
IMAGES = """() => Array.from(document.images).map(i => ({
    src: i.getAttribute('src'), complete: i.complete, natural: i.naturalWidth, naturalHeight: i.naturalHeight,
    shown: i.width, shownHeight: i.height, room: i.parentElement.clientWidth}))"""


def open_page(browser, page_file: Path, width: int, phone: bool) -> tuple[dict, list[dict], list[str]]:
    """The page at ``width`` CSS pixels (as a phone: the page's own viewport settings apply): its layout
    numbers, its images and the console errors it logged."""
    context = browser.new_context(viewport={"width": width, "height": 800}, is_mobile=phone,
                                  device_scale_factor=2 if phone else 1)
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("requestfailed", lambda request: errors.append(f"failed to load {request.url}"))
        page.goto(page_file.as_uri(), wait_until="load")
        layout = page.evaluate("() => ({inner: window.innerWidth, scroll: document.documentElement.scrollWidth,"
                               " body: document.body.scrollWidth})")
        return layout, page.evaluate(IMAGES), errors
    finally:
        context.close()


@pytest.mark.parametrize("width", [DESKTOP, PHONE])
def test_the_page_fits_its_width_loads_every_figure_and_logs_no_error(browser, report, width) -> None:
    layout, images, errors = open_page(browser, report, width, phone=width == PHONE)
    assert not errors, errors
    assert layout["inner"] == width, f"the page is laid out {layout['inner']} px wide on a {width} px screen: {layout}"
    assert layout["scroll"] <= width and layout["body"] <= width, f"horizontal overflow at {width} px: {layout}"
    figures = sorted(p.name for p in report.parent.glob("*.png"))
    assert len(figures) >= 13 and sorted(i["src"] for i in images) == figures, "the page shows every figure written"
    for image in images:
        assert image["complete"] and image["natural"] > 0, f"{image['src']} did not load"
        # Never larger than the PNG, as large as it where there is room, and with its own proportions.
        assert image["shown"] <= image["natural"] + 0.5, image
        assert image["shown"] >= min(image["natural"], image["room"] - 2) - 0.5, image
        ratio = image["naturalHeight"] / image["natural"]
        assert abs(image["shownHeight"] - image["shown"] * ratio) <= 2, image


def test_at_a_desktop_width_a_figure_that_fits_is_shown_at_its_natural_size(browser, report) -> None:
    _, images, _ = open_page(browser, report, DESKTOP, phone=False)
    fitting = [image for image in images if image["natural"] <= image["room"]]
    assert fitting, "no figure fits a 1280 px page"
    for image in fitting:
        assert abs(image["shown"] - image["natural"]) <= 0.5, image
