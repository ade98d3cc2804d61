"""Writing the results: bench.json (everything measured) and bench.md (the tables)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .concern import Concern


def mib(nbytes: object) -> str:
    return f"{nbytes / 2**20:,.1f}" if isinstance(nbytes, (int, float)) else "-"


def table(rows: Sequence[dict], keys: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows`` (dicts), one column per key (default: the first row's keys)."""
    keys = list(keys or rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def targets_table(targets: list[dict]) -> str:
    lines = ["| target | measured | limit | holds |", "|---|---:|---:|---|"]
    lines += [f"| {t['target']} | {t['value']:.3f} | {t['holds_if']} {t['limit']} | {'yes' if t['holds'] else 'NO'} |"
              for t in targets]
    return "\n".join(lines)


def markdown(report: dict, concerns: dict[str, Concern]) -> str:
    v = report["versions"]
    lines = [f"**{report['date']}**, {report['hardware']}, {report['device']} {report['dtype']}, "
             f"{report['threads']} threads; torch {v['torch']}, transformers {v['transformers']}, "
             f"transformer-lens {v['transformer_lens']}, safetensors {v['safetensors']}. "
             f"Load average at the end: {report['load_average']}.", ""]
    for name, concern in concerns.items():
        if name in report:
            lines += [f"### {name}", "", concern.markdown(report[name]), ""]
    if report["targets"]:
        lines += ["### targets", "", targets_table(report["targets"]), ""]
    lines += [f"Rerun: `{report['command']}`", ""]
    return "\n".join(lines)


def write(report: dict, concerns: dict[str, Concern], out: Path) -> None:
    """bench.json and bench.md in ``out``, as UTF-8."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (out / "bench.md").write_text(markdown(report, concerns), encoding="utf-8")
