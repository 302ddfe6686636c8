"""``lightning-mup report SWEEP_DIR``: PNG figures, one HTML page and a Markdown twin with the numbers
behind every figure; figures without data are listed with what would provide it.

``report.html`` carries its figures inside it (base64 PNGs): the page alone can be moved, mailed or
attached. ``report.md`` links the PNGs beside it."""

from __future__ import annotations

import base64
import html
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_mup.report.figures import FIGURES, Figure
from lightning_mup.report.runs import Run, discover


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def build_report(sweep: str | Path, out: str | Path | None = None, problems: list[str] | None = None) -> list[Figure]:
    """Write ``report.html``, ``report.md``, ``figures.json`` and the PNGs into ``out``
    (default ``<sweep>/report``); returns the figures. Files left out as unreadable or inconsistent are
    listed in the report and appended to ``problems``."""
    sweep = Path(sweep)
    out = Path(out) if out is not None else sweep / "report"
    problems = problems if problems is not None else []
    runs = discover(sweep, problems)
    out.mkdir(parents=True, exist_ok=True)
    figures = [make(runs, out) for make in FIGURES]  # (a figure that fails says so in its skip reason)
    problems += sorted({p for run in runs for p in run.problems})
    _write_html(figures, runs, sweep, out / "report.html", problems)
    _write_markdown(figures, runs, sweep, out / "report.md", problems)
    (out / "figures.json").write_text(
        json.dumps(
            [
                {
                    "key": f.key,
                    "title": f.title,
                    "path": f.path.name if f.path else None,
                    "header": f.header,
                    "rows": f.rows,
                    "note": f.note,
                    "caveats": f.caveats,
                    "skipped": f.skipped,
                }
                for f in figures
            ],
            indent=1,
            default=float,
        )
    )
    return figures


def _summary(runs: Sequence[Run], sweep: Path) -> str:
    widths = sorted({r.width for r in runs})
    seeds = sorted({r.seed for r in runs})
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    forms = sorted({r.parametrization for r in runs if r.parametrization})
    text = f"{len(runs)} finished runs in {sweep}: widths {widths}, seeds {seeds}"
    if lrs:
        text += f", learning rates {lrs}"
    if forms:
        text += f", parametrizations {forms}"
    return text


def _write_html(
    figures: Sequence[Figure], runs: Sequence[Run], sweep: Path, path: Path, problems: Sequence[str]
) -> None:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>lightning_mup report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
        "font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}"
        ".skip{color:#888}.caveat{color:#b22222}</style>",
        "<h1>Consistency across widths</h1>",
        f"<p>{html.escape(_summary(runs, sweep))}</p>",
    ]
    if problems:
        parts.append("<h2>Left out (unreadable or inconsistent files)</h2><ul>")
        parts += [f"<li>{html.escape(p)}</li>" for p in problems]
        parts.append("</ul>")
    for f in figures:
        parts.append(f"<h2>{html.escape(f.title)}</h2>")
        if f.skipped:
            parts.append(f"<p class='skip'>skipped: {html.escape(f.skipped)}</p>")
            continue
        image = base64.b64encode(f.path.read_bytes()).decode("ascii")
        parts.append(f"<img src='data:image/png;base64,{image}' alt='{html.escape(f.title)}'>")
        if f.note:
            parts.append(f"<p>{html.escape(f.note)}</p>")
        parts += [f"<p class='caveat'>⚠ {html.escape(c)}</p>" for c in f.caveats]
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in f.header) + "</tr>")
        for row in f.rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>")
        parts.append("</table>")
    path.write_text("\n".join(parts))


def _write_markdown(
    figures: Sequence[Figure], runs: Sequence[Run], sweep: Path, path: Path, problems: Sequence[str]
) -> None:
    lines = ["# Consistency across widths", "", _summary(runs, sweep), ""]
    if problems:
        lines += ["## Left out (unreadable or inconsistent files)", "", *[f"- {p}" for p in problems], ""]
    for f in figures:
        lines += [f"## {f.title}", ""]
        if f.skipped:
            lines += [f"*skipped: {f.skipped}*", ""]
            continue
        lines += [f"![{f.title}]({f.path.name})", ""]
        if f.note:
            lines += [f.note, ""]
        lines += [f"> ⚠ {c}\n" for c in f.caveats]
        lines += ["| " + " | ".join(f.header) + " |", "|" + "---|" * len(f.header)]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in f.rows]
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv: list[str]) -> None:
    """``lightning-mup report SWEEP_DIR [--out DIR]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="lightning-mup report", description="Turn a sweep folder into a report.")
    parser.add_argument("sweep", type=Path, help="the sweep folder (lightning-mup sweep --out ...)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: <sweep>/report)")
    args = parser.parse_args(argv)
    try:
        report_command(args.sweep, args.out)
    except FileNotFoundError as error:
        parser.error(str(error))


def report_command(sweep: Path, out: Path | None = None) -> None:
    """Turn a sweep folder into figures and a report."""
    problems: list[str] = []
    figures = build_report(sweep, out, problems)
    destination = Path(out) if out is not None else Path(sweep) / "report"
    for problem in problems:
        print(f"left out  {problem}", file=sys.stderr)
    for f in figures:
        print(f"{'skipped' if f.skipped else 'figure ':8s} {f.key:16s} {f.skipped or f.path}")
    print(f"report: {destination / 'report.html'} (and report.md)")
