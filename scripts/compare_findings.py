#!/usr/bin/env python
"""Every finding of the notes, side by side for several reports: a markdown table for README.

    .venv/bin/python scripts/compare_findings.py report-random/ report-trained/ --names random trained

Reads each directory's report.json (written by ``minigpt report``) and prints one row per claim:
whether it holds in each report, with the measured numbers the report gave for it. The findings are
the lecture notes' claims, described in docs/NOTES.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

MARK = {True: "holds", False: "**does not hold**", None: "measured"}


def _mark(finding: dict) -> str:
    """holds / does not hold / measured, or 'not testable' (a claim this model cannot test; older reports lack the key)."""
    return "not testable" if finding.get("testable") is False else MARK[finding["holds"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("reports", nargs="+", type=Path, help="report directories (each with report.json)")
    p.add_argument("--names", nargs="+", default=None, help="a column title per report")
    args = p.parse_args()
    names = args.names or [str(r) for r in args.reports]
    payloads = [json.loads((r / "report.json").read_text(encoding="utf-8")) for r in args.reports]
    findings = [{f"{s['id']}.{x['key']}": x for s in p["sections"] for x in s["findings"]} for p in payloads]
    print("| finding (report.json key) | claim | needs trained weights | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for key, first in findings[0].items():
        cells = ["-" if key not in found else f"{_mark(found[key])}: {found[key]['detail']}" for found in findings]
        row = [f"`{key}`", first["claim"], "yes" if first["needs_trained_weights"] else "", *cells]
        print("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")


if __name__ == "__main__":
    main()
