"""The report end to end on a tiny model: every referenced image exists and is a PNG, the JSON
carries every verdict the page shows, random weights are flagged, and the CLI writes it all."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import probes
from minigpt import GPT, GPTConfig
from minigpt.cli import main
from minigpt.errors import InputError
from minigpt.weights import to_hf_state_dict

pytest.importorskip("matplotlib")
from probes.report import build_report  # noqa: E402  (needs matplotlib)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT = "The cat sat on the mat, and then it looked at the dog."
# GPT-2's vocabulary (so the text tokenizes) on a tiny body.
TINY = GPTConfig(n_embd=32, n_layer=3, n_head=4, n_positions=64)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, dict, list[str]]:
    out = tmp_path_factory.mktemp("report")
    messages: list[str] = []
    payload = build_report(GPT.random(TINY, seed=3), TEXT, out, progress=messages.append)
    return out, payload, messages


def referenced_images(page: str) -> list[str]:
    return re.findall(r"<img src='([^']+)'", page)


def test_html_names_only_existing_pngs(written):
    out, payload, _ = written
    page = (out / "index.html").read_text(encoding="utf-8")
    images = referenced_images(page)
    assert len(images) == 15 and len(set(images)) == len(images)
    for name in images:
        path = out / html.unescape(name)
        assert path.is_file(), name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
    # Every PNG written is on the page, and the JSON lists the same figures.
    assert sorted(p.name for p in out.glob("*.png")) == sorted(images)
    assert sorted(f["file"] for s in payload["sections"] for f in s["figures"]) == sorted(images)


def test_json_carries_every_verdict_on_the_page(written):
    out, payload, _ = written
    on_disk = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert on_disk == payload
    page = (out / "index.html").read_text(encoding="utf-8")
    ids = [s["id"] for s in on_disk["sections"]]
    assert ids == ["reconstruction", "final_norm", "interventions", "distributions", "logit_lens", "attribution",
                   "induction", "attention_sink"]
    for section in on_disk["sections"]:
        assert section["findings"] and section["verdict"]
        keys = {x["key"] for x in section["findings"]}
        for figure in section["figures"]:
            assert figure["caption"] and html.escape(figure["caption"]) in page
            assert set(figure["findings"]) <= keys
        for finding in section["findings"]:
            assert html.escape(finding["claim"]) in page and html.escape(finding["detail"]) in page
            assert finding["holds"] in (True, False, None)
        for table in section["tables"]:
            assert html.escape(table["title"]) in page
            assert all(len(row) == len(table["columns"]) for row in table["rows"])
    # The facts that hold for any weights hold here; the notes' architectural claims are checked.
    verdicts = {(s["id"], x["key"]): x["holds"] for s in on_disk["sections"] for x in s["findings"]}
    assert verdicts[("reconstruction", "law")] is True
    assert verdicts[("final_norm", "normalised")] is True
    assert verdicts[("interventions", "scale_10.exact_factor")] is True
    assert verdicts[("interventions", "scale_0.1.exact_factor")] is True
    assert verdicts[("logit_lens", "final_equals_logits")] is True
    assert verdicts[("attribution", "sum")] is True
    assert on_disk["n_tokens"] == len(GPT.random(TINY).tokens(TEXT)[0])


def test_random_weights_are_flagged(written):
    out, payload, messages = written
    page = (out / "index.html").read_text(encoding="utf-8")
    assert payload["model"]["random_weights"] is True
    assert "RANDOM weights, not a trained GPT-2" in page
    assert payload["trained_only"] and all(html.escape(claim) in page for claim in payload["trained_only"])
    assert payload["model"]["source"] in page
    assert len(messages) >= 8 and any("[8/8]" in m for m in messages)  # progress, step by step


def test_trained_weights_get_no_banner(tmp_path):
    model = GPT.random(GPTConfig(n_embd=16, n_layer=1, n_head=2, n_positions=64), seed=0)
    model.provenance = "weights from a trained checkpoint"
    payload = build_report(model, TEXT, tmp_path, progress=lambda _: None)
    assert payload["model"]["random_weights"] is False
    assert "RANDOM weights" not in (tmp_path / "index.html").read_text(encoding="utf-8")
    # A 1-block model has no penultimate block: that claim is marked not applicable.
    final = next(s for s in payload["sections"] if s["id"] == "final_norm")
    earlier = {x["key"]: x for x in final["findings"]}["earlier_equal"]
    assert earlier["holds"] is None and earlier["testable"] is False
    assert "not testable on this model" in (tmp_path / "index.html").read_text(encoding="utf-8")


def test_induction_and_sink_sections_carry_their_numbers(written):
    """Each head's induction score and each block's attention on position 0, as the probes measure them."""
    _, payload, _ = written
    sections = {s["id"]: s for s in payload["sections"]}
    induction, sink = sections["induction"], sections["attention_sink"]
    model = GPT.random(TINY, seed=3)
    expected = probes.induction_scores(model, n=induction["data"]["n"], batch=induction["data"]["batch"])
    assert torch.tensor(induction["data"]["scores"]) == pytest.approx(expected.scores, abs=1e-6)
    assert len(induction["data"]["top_heads"]) == 3 and {x["key"] for x in induction["findings"]} == {"heads", "loss"}
    direct = probes.attention_sink(model, TEXT)
    assert torch.tensor(sink["data"]["mass"]) == pytest.approx(direct.mass, abs=1e-6)
    assert sink["data"]["uniform"] == pytest.approx(direct.uniform)
    # Random weights attend about uniformly: neither claim holds.
    assert all(x["holds"] is False for x in induction["findings"] + sink["findings"])


def test_out_must_be_a_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="directory"):
        build_report(GPT.random(TINY), TEXT, blocker, progress=lambda _: None)


def write_checkpoint(model: GPT, directory: Path) -> Path:
    directory.mkdir()
    state = to_hf_state_dict(model.state_dict(), model.cfg.n_layer)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(model.cfg.to_hf()))
    return directory


def test_cli_report_from_a_local_directory(tmp_path, capsys):
    checkpoint = write_checkpoint(GPT.random(TINY, seed=5), tmp_path / "ckpt")
    out = tmp_path / "out"
    assert main(["report", TEXT, "--model", str(checkpoint), "--out", str(out), "--block", "1", "--head", "0"]) == 0
    payload = json.loads((out / "report.json").read_text(encoding="utf-8"))
    interventions = next(s for s in payload["sections"] if s["id"] == "interventions")
    assert interventions["data"]["block"] == 1 and interventions["data"]["head"] == 0
    assert str(checkpoint) in payload["model"]["source"]
    assert all((out / f["file"]).read_bytes()[:8] == PNG_MAGIC for s in payload["sections"] for f in s["figures"])
    assert "[8/8]" in capsys.readouterr().err


def test_cli_report_refuses_a_file_as_out(tmp_path, capsys):
    checkpoint = write_checkpoint(GPT.random(TINY, seed=5), tmp_path / "ckpt")
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    assert main(["report", TEXT, "--model", str(checkpoint), "--out", str(blocker)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_report_state_dict_untouched(tmp_path):
    """Running the report leaves the model as it was (edits last for one call)."""
    model = GPT.random(TINY, seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    build_report(model, TEXT, tmp_path, progress=lambda _: None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_report_links_the_attention_view(written):
    out, payload, _ = written
    assert payload["attention_view"] == "attention.html" and (out / "attention.html").is_file()
    assert "<a href='attention.html'>" in (out / "index.html").read_text(encoding="utf-8")
