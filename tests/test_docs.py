"""docs/ stays true: ARCHITECTURE.md's tap table is ``minigpt.describe(1)``, and NOTES.md names
tests, probes and edits that exist."""
from __future__ import annotations

import re
from pathlib import Path

import minigpt
import probes
from minigpt import edits

DOCS = Path(__file__).resolve().parent.parent / "docs"
TESTS = Path(__file__).resolve().parent


def tap_table() -> str:
    """The tap table as docs/ARCHITECTURE.md shows it, rendered from ``minigpt.describe(1)``."""
    rows = ["| tap | shape | what it holds | on demand |", "|---|---|---|---|"]
    rows += [f"| `{t.name}` | {t.shape} | {t.meaning} | {'yes' if t.on_demand else ''} |" for t in minigpt.describe(1)]
    return "\n".join(rows)


def test_architecture_tap_table_is_describe() -> None:
    text = (DOCS / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert tap_table() in text, "regenerate the table in docs/ARCHITECTURE.md:\n" + tap_table()


def test_notes_name_tests_probes_and_edits_that_exist() -> None:
    text = (DOCS / "NOTES.md").read_text(encoding="utf-8")
    tests = set(re.findall(r"`(test_\w+?)`", text)) - {name for name in re.findall(r"`(test_\w+)\.py`", text)}
    defined = {m for path in TESTS.glob("test_*.py")
               for m in re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.M)}
    assert tests and tests <= defined, sorted(tests - defined)
    probe_calls = set(re.findall(r"`probes\.(\w+)", text)) - {"_common", "interventions"}
    assert probe_calls and all(hasattr(probes, name) for name in probe_calls), probe_calls
    edit_calls = set(re.findall(r"`(\w+)\(block", text))
    assert edit_calls == {"zero_head_keys", "noise_neurons", "scale_block"}
    assert all(hasattr(edits, name) for name in edit_calls)
