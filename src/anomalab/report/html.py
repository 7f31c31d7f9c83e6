"""One self-contained HTML page from run folders: built from their JSON records and PNG figures only
(images inlined as base64, no scripts, no external files), so it opens offline and can be mailed."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path

from anomalab.errors import RunFolderError

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:.85em;color:#555}
img{max-width:100%}code{background:#f6f6f6;padding:0 .2em}.muted{color:#777;font-size:.9em}
"""


def _read(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: list[dict], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    cells = ("".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in columns) for r in rows)
    body = "".join(f"<tr>{c}</tr>" for c in cells)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    caption = html.escape(path.stem.replace("_", " "))
    img = f'<img src="data:image/png;base64,{data}" alt="{caption}">'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def run_summary(run: Path) -> dict:
    """Detector, data and metrics of one run folder, from its JSON records."""
    config = _read(run / "config.json") or {}
    ev = _read(run / "evaluation.json") or {}
    row = {"run": run.name, "detector": config.get("detector", ev.get("detector", "?")),
           "data": config.get("data", ev.get("dataset", "?"))}
    row.update(ev.get("metrics", {}))
    return row


def write_report(runs: Sequence[str | Path], out: str | Path, title: str = "anomalab report") -> Path:
    """Write one HTML page summarising `runs` (folders with config.json / evaluation.json / *.png)."""
    runs = [Path(r) for r in runs]
    for r in runs:
        if not r.is_dir():
            raise RunFolderError(f"run folder not found: {r}")
    rows = [run_summary(r) for r in runs]
    metric_cols = [c for c in ("image_auroc", "aupr", "pixel_auroc", "aupro", "fpr_at_threshold",
                               "tpr_at_threshold") if any(c in row for row in rows)]
    parts = [f"<h1>{html.escape(title)}</h1>", _table(rows, ["run", "detector", "data", *metric_cols])]
    for run in runs:
        config = _read(run / "config.json") or {}
        ev = _read(run / "evaluation.json") or {}
        parts.append(f"<h2>{html.escape(run.name)}</h2>")
        if config:
            params = ", ".join(f"{k}={v}" for k, v in config.get("params", {}).items())
            parts.append(f"<p><b>{html.escape(str(config.get('detector', '')))}</b>({html.escape(params)}) "
                         f"on <code>{html.escape(str(config.get('data', '')))}</code></p>")
            if config.get("command"):
                parts.append(f"<p class=muted>command: <code>{html.escape(config['command'])}</code></p>")
        if ev:
            thr = ev.get("extra", {}).get("threshold")
            if thr:
                parts.append(f"<p>threshold {thr['value']:.4g}, fitted on {thr['n_normal']} normal images "
                             f"only (max FPR {thr['max_fpr']}).</p>")
            timings = {k: v for k, v in ev.get("timings", {}).items()}
            if timings:
                parts.append(_table([timings], list(timings)))
        parts.extend(_figure(p) for p in sorted(run.glob("*.png")))
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    from anomalab.runs.atomic import write_file_atomic

    return write_file_atomic(out, page)
