"""The attention view and plot: the page's embedded numbers are the trace's (to 4 significant digits), its
logit lens and attribution are the probes', '</script>' in a token cannot break out, and in a real headless
browser the page renders offline, reads the trace's weights on hover and switches heads with the picker."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.errors import InputError
from probes.attention_page import render_attention_view
from probes.attention_view import MAX_TOKENS, page_json, rounded, view_data, write_attention_view
from probes.attribution import attribute
from probes.logit_lens import lens

TEXT = "The cat sat on the mat, and then it looked at the dog."
TINY = GPTConfig(n_embd=32, n_layer=2, n_head=4, n_positions=160)
HOSTILE = "</script><img src=x onerror=alert(1)>"
DATA = re.compile(r"<script type='application/json' id='view-data'>(.*?)</script>", re.S)


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT.random(TINY, seed=5)


@pytest.fixture(scope="module")
def patterns(model) -> torch.Tensor:
    """The trace's own patterns, from a run of its own: [n_layer, H, Q, K]."""
    _, trace = model.run(TEXT, taps=["blocks.*.attn.pattern"])
    return trace.stack("attn.pattern")[:, 0]


@pytest.fixture(scope="module")
def page(model, tmp_path_factory) -> Path:
    return write_attention_view(model, TEXT, tmp_path_factory.mktemp("view") / "attention.html")


def embedded(path: Path) -> dict:
    found = DATA.findall(path.read_text(encoding="utf-8"))
    assert len(found) == 1
    return json.loads(found[0])


def close(shown: float, exact: float, noise: float = 1e-30) -> bool:
    """``shown`` is ``exact`` to 4 significant digits (half a unit in the 4th digit), or both within ``noise`` of 0."""
    return math.isclose(shown, exact, rel_tol=5e-4, abs_tol=noise)


def test_embedded_patterns_are_the_traces(page, patterns):
    data = embedded(page)
    L, H, Q, K = patterns.shape
    assert (data["n_layer"], data["n_head"], len(data["tokens"])) == (L, H, Q)
    assert torch.equal(patterns.triu(1), torch.zeros_like(patterns))  # the half left out is exactly 0
    for layer in range(L):
        for head in range(H):
            rows = data["patterns"][layer][head]
            assert [len(row) for row in rows] == list(range(1, Q + 1))
            for q, row in enumerate(rows):
                exact = patterns[layer, head, q, :q + 1].tolist()
                assert all(close(s, e) for s, e in zip(row, exact)), (layer, head, q, row, exact)
                assert row == [float(f"{v:.4g}") for v in row]  # kept to 4 significant digits
                assert abs(sum(row) - 1) < 2e-3


def test_lens_and_attribution_are_the_probes(model, page):
    data = embedded(page)
    for position in (0, 5, len(data["tokens"]) - 1):
        ll = lens(model, TEXT, position=position, k=5)
        assert data["lens"]["labels"] == ll.labels
        assert data["lens"]["top_ids"][position] == ll.top_ids.tolist()
        assert all(close(s, e) for s, e in zip(sum(data["lens"]["top_probs"][position], []),
                                               ll.top_probs.flatten().tolist()))
        assert all(close(s, e) for s, e in zip(data["lens"]["predicted_prob"][position], ll.target_prob.tolist()))
        a = attribute(model, TEXT, position=position)
        att = data["attribution"]
        assert att["target"][position] == a.target_id == ll.target_id
        # The attention biases are 0 in a fresh model: their parts are float rounding (1e-9), which differs
        # between this run and the probe's (it keeps one position).
        assert all(close(s, e, noise=1e-7) for s, e in zip(att["parts"][position], a.contributions[:-1].tolist()))
        assert close(att["ln_f_bias"][position], a.ln_f_bias) and close(att["sigma"][position], a.scale)
        assert close(att["logit"][position], a.logit) and att["sum_error"][position] < 1e-4
    assert data["strings"][str(data["ids"][1])] == data["tokens"][1]


def test_script_in_a_token_stays_inside_the_json():
    data = {"tokens": [HOSTILE, "a & b", "\u2028"], "n": 1.5}
    text = page_json(data)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == data
    whole = render_attention_view(text, title=HOSTILE, meta=HOSTILE)
    assert whole.count("</script>") == 2 and "<img" not in whole  # the data's and the script's own closing tags


def test_rounding_and_limits(model, tmp_path):
    assert rounded(torch.tensor([[0.123456, 1.0e-7 / 3], [float("nan"), -2.71828]], dtype=torch.float64)) == \
        [[0.1235, 3.333e-08], [None, -2.718]]
    with pytest.raises(InputError, match=f"at most {MAX_TOKENS} tokens"):
        view_data(model, list(range(MAX_TOKENS + 1)))
    with pytest.raises(InputError, match="directory"):
        write_attention_view(model, TEXT, tmp_path)
    with pytest.raises(InputError, match="one sequence"):
        view_data(model, ["one text", "another"])
    with pytest.raises(InputError, match="k must be"):
        view_data(model, TEXT, k=0)


def test_plot_attention_draws_the_chosen_patterns(model, patterns):
    pytest.importorskip("matplotlib")
    from probes.plots import plot_attention

    _, trace = model.run(TEXT, taps=["blocks.*.attn.pattern"])
    tokens = model.str_tokens(TEXT)
    fig = plot_attention(trace, tokens, layers=[1, 0], heads=[3, -4])
    images = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in images] == ["b1.h3", "b1.h0", "b0.h3", "b0.h0"]
    for ax, (layer, head) in zip(images, [(1, 3), (1, 0), (0, 3), (0, 0)]):
        assert torch.equal(torch.as_tensor(ax.images[0].get_array().data), patterns[layer, head])
    assert [t.get_text() for t in images[0].get_yticklabels()] == tokens
    from_tensor = plot_attention(patterns, tokens, layers=[0], heads=[1])
    assert [ax.get_title() for ax in from_tensor.axes if ax.images] == ["b0.h1"]
    assert len([ax for ax in plot_attention(trace, tokens).axes if ax.images]) == TINY.n_layer * TINY.n_head
    with pytest.raises(InputError, match="head 4 is out of range"):
        plot_attention(trace, tokens, heads=[4])
    with pytest.raises(InputError, match="label the"):
        plot_attention(trace, tokens[:-1])
    with pytest.raises(InputError, match="no attention pattern"):
        plot_attention(model.run(TEXT, taps=["embed"])[1], tokens)


# --- in a real headless browser: Debian's chromium driven by Playwright (never `playwright install`) ---

def open_offline(browser, path: Path):
    """A page opened from ``path`` with every request recorded and all but the page itself refused."""
    page = browser.new_page()
    requests, errors = [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: (errors.append(f"dialog {dialog.message}"), dialog.dismiss()))
    page.route("**/*", lambda route: route.continue_() if route.request.url == path.as_uri() else route.abort())
    page.goto(path.as_uri())
    return page, requests, errors


def hover_weight(page, q: int, k: int) -> tuple[str, float]:
    page.hover(f"#heat td[data-q='{q}'][data-k='{k}']")
    return page.text_content("#readout-what"), float(page.text_content("#readout-value"))


def test_browser_hover_reads_the_traces_weights(browser, page, patterns):
    view, requests, errors = open_offline(browser, page)
    try:
        Q = patterns.shape[2]
        assert view.locator("#heat tbody tr").count() == Q and view.locator("#strip span").count() == Q
        data = embedded(page)
        for layer, head, q, k in [(0, 0, 3, 1), (1, 2, Q - 1, 4), (1, 3, 7, 7)]:
            view.select_option("#layer", str(layer))
            view.select_option("#head", str(head))
            assert view.text_content("#shown-head") == f"block {layer}, head {head}"
            what, value = hover_weight(view, q, k)
            assert what.startswith(f"block {layer} head {head}: query {q} ")
            assert value == data["patterns"][layer][head][q][k]  # the number shown is the page's, exactly
            assert close(value, patterns[layer, head, q, k].item())
        # The head picker switches the pattern drawn: the same cell under another head reads and looks different.
        cell = f"#heat td[data-q='{Q - 1}'][data-k='0']"
        view.select_option("#head", "0")
        before = view.eval_on_selector(cell, "td => td.style.background")
        _, first = hover_weight(view, Q - 1, 0)
        view.select_option("#head", "1")
        _, second = hover_weight(view, Q - 1, 0)
        assert close(second, patterns[1, 1, Q - 1, 0].item()) and first != second
        assert view.eval_on_selector(cell, "td => td.style.background") != before
        # Choosing a query moves the lens and attribution there; a head clicked in the attribution is shown.
        view.click("#strip span[data-k='4']")
        assert view.text_content("#lens-title").startswith("Logit lens at position 4 ")
        view.click("#dla tr:nth-child(2) td:nth-child(4)")  # block 0, head 2
        assert view.text_content("#shown-head") == "block 0, head 2"
        view.hover("#dla tr:nth-child(3) td:nth-child(2)")  # block 1, head 0
        assert float(view.text_content("#readout-value")) == data["attribution"]["parts"][4][2 + 1 * (TINY.n_head + 2)]
    finally:
        view.close()
    assert errors == []
    assert requests == [page.as_uri()]  # no network: not a script, a style, a font or an icon


def test_browser_shows_a_script_token_as_text(browser, model, tmp_path):
    data = view_data(model, TEXT)
    data["tokens"][0] = HOSTILE
    path = tmp_path / "hostile.html"
    path.write_text(render_attention_view(page_json(data), title=HOSTILE, meta=HOSTILE), encoding="utf-8")
    view, requests, errors = open_offline(browser, path)
    try:
        assert view.text_content("#strip span[data-k='0']") == HOSTILE
        assert view.locator("img").count() == 0 and view.title() == HOSTILE
        what, _ = hover_weight(view, 2, 0)
        assert what.endswith(f"key 0 {HOSTILE}: weight")
    finally:
        view.close()
    assert errors == [] and requests == [path.as_uri()]


def test_readme_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n### Attention, seen\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md (Attention, seen)", "exec"), namespace)
    data = embedded(tmp_path / "attention.html")
    assert data["tokens"] == namespace["model"].str_tokens(namespace["text"])
    assert (tmp_path / "attention.png").read_bytes()[:4] == b"\x89PNG"
    assert [ax.get_title() for ax in namespace["fig"].axes if ax.images] == ["b0.h0", "b0.h1", "b3.h0", "b3.h1"]
