"""The report's files: their names, and writing the JSON, markdown and PNG.

The report is one dict (the JSON); the markdown and the PNG are rendered from it alone, so
`gpu_report.py --render REPORT.json` rewrites them later.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from .markdown import render_markdown
from .plan import PHASES
from .plot import render_plot

SCHEMA = 3  # 2: the warm and smoke phases, per-backend smoke verdicts, Triton cache counts; 3: the verify phase
LOGS = ("build_log", "warm_log", "verify_log", "smoke_log", "tests_log", "benchmarks_log")  # output_paths' logs, in phase order


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def report_stem(gpu: dict | None, date_utc: str, phases: set[str]) -> str:
    """<gpu>-<yyyy-mm-dd>, with the phases joined on when not all of them run, so that a
    partial run does not overwrite the day's full one."""
    stem = f"{slug(gpu['name']) if gpu else 'cpu-smoke'}-{date_utc[:10]}"
    if phases != set(PHASES):
        stem += "-" + "-".join(p for p in PHASES if p in phases)
    return stem


def output_paths(out_dir: Path, stem: str) -> dict:
    """{dir, stem, and each of LOGS: <stem>-<phase>.log}."""
    return dict(dir=out_dir, stem=stem, **{log: out_dir / f"{stem}-{log.removesuffix('_log')}.log" for log in LOGS})


def write_report(report: dict, out_dir: Path, plot: bool = False) -> None:
    """Writes <stem>.json and <stem>.md, and with plot=True <stem>.png (or, without matplotlib,
    the reason in report['plot_note'])."""
    stem = report["stem"]
    if plot:
        note = render_plot(report, out_dir / f"{stem}.png")
        report["plot"], report["plot_note"] = (None, note) if note else (f"{stem}.png", None)
        if note:
            print(f"[gpu_report] {note}", file=sys.stderr)
    tmp = out_dir / f".{stem}.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(out_dir / f"{stem}.json")
    (out_dir / f"{stem}.md").write_text(render_markdown(report))
