"""report.html: the report as one file a browser opens offline (images embedded as base64 PNG,
inline CSS, no scripts)."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Mapping, Sequence

from longtail.engine.rundir import write_output

__all__ = ["write_html"]

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.85em}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}td{text-align:right}td:first-child,td:nth-child(2){text-align:left}
.within{color:#777}.outside{font-weight:bold}figure{display:inline-block;margin:0.5em;vertical-align:top}
figcaption{font-size:0.85em;text-align:center}img{max-width:100%}"""

Table = tuple[Sequence[str], Sequence[Sequence[str]]]


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(table: Table, table_id: str) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        verdict = row[-1] if table_id == "differences" else ""
        css = {"within noise": ' class="within"', "outside noise": ' class="outside"'}.get(verdict, "")
        body.append(f"<tr{css}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def write_html(path: Path, summary: Table, differences: Table, runs: Table, plots: Mapping[str, Path],
               reliability: Mapping[str, Path], note: str = "", differences_note: str = "") -> Path:
    """The recipes' table, paired differences, every run, the plots and each recipe's reliability
    diagram (its first run's test predictions) side by side."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>longtail report</title>',
             f"<style>{STYLE}</style></head><body>", "<h1>longtail report</h1>",
             f"<p>Mean ± sample std over seeds; n = runs. {html.escape(note)}</p>",
             "<h2>Recipes</h2>", _table(summary, "recipes"),
             "<p>Paper values only where dataset, imbalance factor, backbone, schedule length and method match.</p>",
             "<h2>Differences (paired over shared seeds)</h2>",
             *([_table(differences, "differences")] if differences[1] else []),
             *([f"<p>{html.escape(differences_note)}</p>"] if differences_note else []),
             "<p><i>within noise</i>: the 95% interval of the mean paired difference contains 0 "
             "(paired t-test, p ≥ 0.05).</p>", "<h2>Plots</h2>"]
    parts += [f"<figure>{_image(file, title)}<figcaption>{html.escape(title)}</figcaption></figure>"
              for title, file in plots.items()]
    parts.append("<h2>Reliability diagrams (test set, first run of each recipe)</h2><div>")
    parts += [f"<figure style=\"width:32%\">{_image(file, f'reliability: {label}')}"
              f"<figcaption>{html.escape(label)}</figcaption></figure>" for label, file in reliability.items()]
    parts += ["</div>", "<h2>Runs</h2>", _table(runs, "runs"), "</body></html>"]
    return write_output(path, "\n".join(parts))
