"""One self-contained HTML page from run folders: built from their JSON records and PNG figures only
(images inlined as base64, no scripts, no external files), so it opens offline and can be mailed.

Per run, in the order an inspector reads it: what was fitted on what; the verdicts at the threshold (caught,
missed, false alarms, correctly passed, as a confusion matrix); per defect type (AUROC vs the good images,
recall at the threshold); the missed anomalies and false alarms by file name; the calibration (the held-out
normal scores the threshold was fitted on; the main section of a run without a test set); the figures."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anomalab.errors import RunFolderError
from anomalab.report.figures import read_calibration
from anomalab.report.verdicts import (
    binomial_tail,
    expected_false_alarm_rate,
    per_class,
    select_examples,
    threshold_counts,
)

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0 1em}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
table.cm td.ok{background:#e8f5e9}table.cm td.bad{background:#fdecea}
figure{display:inline-block;margin:.5em;vertical-align:top;max-width:100%}
figcaption{font-size:.85em;color:#555;max-width:46em}
img{max-width:100%}code{background:#f6f6f6;padding:0 .2em}.muted{color:#777;font-size:.9em}
.warn{background:#fff8e1;border-left:4px solid #f9a825;padding:.4em .8em}
h2{border-top:2px solid #ddd;padding-top:.6em;margin-top:1.6em}ul.names{font-size:.9em}
.wide{overflow-x:auto}.wide table{font-size:.85em}
"""

#: Figures in reading order, with what each shows; any other PNG of the run follows, captioned by its name.
FIGURES = {
    "score_histogram": "Test scores of normal vs anomalous images (each as a fraction of its group) and the "
                       "threshold; the green outline is the normal images the threshold was fitted on (held "
                       "out of training, or scored out-of-fold). A log axis is used when the scores are skewed.",
    "scores_by_type": "Every test image's score, one row per type (blue normal, orange anomalous), against the "
                      "threshold: orange points left of the line are missed, blue points right of it are false "
                      "alarms.",
    "roc": "ROC curve; the dot is the operating point at the threshold.",
    "hardest_cases": "Missed anomalies (scored at or below the threshold) and false alarms (normal images "
                     "scored above it), with file names. Cyan outlines: ground-truth defect masks. Map "
                     "colours share one scale across all examples, its midpoint at the pixel threshold; the "
                     "overlay colours only the pixels above it (the predicted defect area).",
    "most_anomalous": "The highest-scored test images, on the same map scale.",
    "calibration_scores": "Scores of the normal images the threshold was fitted on, and the threshold; the "
                          "green outline is training images (seen in training, so they score lower: a wide gap "
                          "means the detector memorised them).",
    "calibration_examples": "The highest-scored and typical of those normal images (and a few training images "
                            "when only a few are held out), with their anomaly maps on one shared scale: what "
                            "normal looks like to this detector.",
    "loss_curves": "Training losses per epoch.",
}


def _read(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "–"
    return html.escape(str(v))


def _pct(k: int, n: int) -> str:
    return f"{k} of {n} ({100 * k / n:.1f} %)" if n else "0 of 0"


def _table(rows: list[dict], columns: list[str], attrs: str = "", headers: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in (headers or columns))
    cells = ("".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in columns) for r in rows)
    body = "".join(f"<tr>{c}</tr>" for c in cells)
    return f"<table{attrs}><tr>{head}</tr>{body}</table>"


def _figure(path: Path, caption: str | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    name = html.escape(path.stem.replace("_", " "))
    text = f"<b>{name}</b>" + (f": {html.escape(caption)}" if caption else "")
    img = f'<img src="data:image/png;base64,{data}" alt="{name}">'
    return f"<figure>{img}<figcaption>{text}</figcaption></figure>"


def _figures(run: Path) -> list[str]:
    pngs = {p.stem: p for p in run.glob("*.png")}
    known = [_figure(pngs.pop(k), text) for k, text in FIGURES.items() if k in pngs]
    return known + [_figure(pngs[k]) for k in sorted(pngs)]


def _sizes(config: dict) -> str:
    if "n_train" not in config:
        return ""
    if (config.get("calib_folds") or 0) >= 2:
        return (f", {config['n_train']} training images, each also scored out-of-fold for the threshold "
                f"({config['calib_folds']}-fold cross-fitting)")
    return f", {config['n_train']} training images, {config.get('n_calibration', 0)} held out for the threshold"


def run_name(run: Path) -> str:
    """The run's folder name; for a run still being written (a hidden `.<name>.tmp-...` sibling, see
    runs.atomic), the name it will have."""
    from anomalab.runs.atomic import TMP_TAG

    name = run.name
    if name.startswith(".") and TMP_TAG in name:
        return name[1 : name.rindex(TMP_TAG)]
    return name


def _threshold_of(run: Path, ev: dict, record: dict | None = None) -> dict | None:
    """The run's image threshold: evaluation.json's (the one its counts are at), else calibration.json's, else
    the saved detector's."""
    thr = ev.get("extra", {}).get("threshold")
    if thr is None and record is not None:
        thr = record.get("threshold")
    if thr is None:
        det = _read(run / "detector" / "detector.json") or {}
        thr = det.get("threshold") if isinstance(det, dict) else None
    return thr if isinstance(thr, dict) and "value" in thr else None


def verdicts(ev: dict) -> dict:
    """Counts, per-type rows and example picks of one evaluation record (evaluation.json), from the values
    it recorded, or recomputed from its scores, labels and threshold for records written without them."""
    extra = ev.get("extra", {})
    scores = np.asarray(ev.get("scores", []), dtype=float)
    labels = np.asarray(ev.get("labels", []), dtype=int)
    thr = extra.get("threshold")
    value = thr["value"] if thr and ev.get("normalize") is None else None
    counts = extra.get("counts")
    if counts is None and value is not None:
        counts = threshold_counts(scores, labels, value)
    rows = extra.get("per_class")
    if rows is None and ev.get("classes") is not None:
        rows = per_class(scores, labels, ev["classes"], extra.get("class_names"), value)
    return {"threshold": value, "counts": counts, "per_class": rows or [],
            "picks": select_examples(scores, labels, value, n=len(scores))}


def counts_table(counts: dict) -> str:
    """The confusion matrix at the threshold as an HTML table (id "counts")."""
    n_norm, n_anom = counts["passed"] + counts["false_alarms"], counts["caught"] + counts["missed"]
    return ("<table id=counts class=cm><tr><th>true label \\ verdict</th><th>passed as normal</th>"
            "<th>flagged anomalous</th><th>total</th></tr>"
            f"<tr><td>normal</td><td class=ok>{counts['passed']} correctly passed</td>"
            f"<td class=bad>{counts['false_alarms']} false alarms</td><td>{n_norm}</td></tr>"
            f"<tr><td>anomalous</td><td class=bad>{counts['missed']} missed</td>"
            f"<td class=ok>{counts['caught']} caught</td><td>{n_anom}</td></tr></table>")


def per_type_table(rows: list[dict]) -> str:
    """Per defect type (anomalous classes): images, caught, missed, recall, AUROC vs the normal images (id
    "per-defect"); a second table of false alarms per normal class when there are several normal classes."""
    def shown(r: dict) -> dict:
        r = dict(r)
        for key in ("recall", "false_alarm_rate"):
            if r.get(key) is not None:
                r[key] = f"{100 * r[key]:.1f} %"
        if r.get("auroc") is not None:
            r["auroc"] = f"{r['auroc']:.3f}"
        return r

    defects = [shown(r) for r in rows if r.get("label") != 0]
    normals = [shown(r) for r in rows if r.get("label") == 0]
    parts = []
    if defects:
        parts.append(_table(defects, ["name", "n", "caught", "missed", "recall", "auroc"], " id=per-defect",
                            ["defect type", "images", "caught", "missed", "recall at threshold",
                             "AUROC vs normal images"]))
    if len(normals) > 1:
        parts.append(_table(normals, ["name", "n", "false_alarms", "false_alarm_rate"], " id=per-normal-class",
                            ["normal class", "images", "false alarms", "false-alarm rate"]))
    return "".join(parts)


def _name_list(ev: dict, idx: list[int], limit: int = 30) -> str:
    names, scores = ev.get("names") or [], ev.get("scores") or []
    items = "".join(f"<li><code>{html.escape(str(names[i]) if i < len(names) else str(i))}</code> "
                    f"score {scores[i]:.4g}</li>" for i in idx[:limit])
    more = f"<p class=muted>… and {len(idx) - limit} more.</p>" if len(idx) > limit else ""
    return f"<ul class=names>{items}</ul>{more}"


def _threshold_note(thr: dict, record: dict | None = None) -> str:
    """How the threshold was set, and the warnings about how far it can be trusted: calibration.json's own
    description and warnings when the run has one, else worked out from the threshold record."""
    n, max_fpr = thr["n_normal"], thr["max_fpr"]
    if thr.get("method", "quantile") == "value":
        text = (f"<p>Threshold <b>{thr['value']:.4g}</b>: a score above it is called anomalous. It was set by "
                f"hand" + (f"; {100 * max_fpr:.3g} % of the {n} kept normal scores are above it" if n else "")
                + ".</p>")
    elif record is not None and record.get("how"):
        text = (f"<p>Threshold <b>{thr['value']:.4g}</b>: a score above it is called anomalous. It is "
                f"{html.escape(str(record['how']))}; never fitted on test images.</p>")
    else:
        text = (f"<p>Threshold <b>{thr['value']:.4g}</b>: a score above it is called anomalous. It was fitted on "
                f"{n} normal images only (never on test images), as the {100 * (1 - max_fpr):.4g} % quantile of "
                f"their scores (max false-alarm rate {max_fpr}).</p>")
    if thr.get("pixel_value") is not None:
        text += (f"<p class=muted>Pixel threshold {thr['pixel_value']:.4g}: anomaly-map pixels above it form the "
                 "predicted defect area (coloured in the overlays).</p>")
    if record is not None:
        warnings = [str(w) for w in record.get("warnings") or []]
    elif thr.get("method", "quantile") == "quantile" and max_fpr > 0 and n < 1 / max_fpr:
        warnings = [f"Only {n} normal images were used for a target false-alarm rate of {max_fpr}: the threshold "
                    f"is then the highest of their scores, and about 1 in {n + 1} new normal images can be "
                    f"expected above it ({100 * expected_false_alarm_rate(n, max_fpr):.0f} %). Fit on more good "
                    "images for a threshold that holds its rate."]
    else:
        warnings = []
    return text + "".join(f"<p class=warn>{html.escape(w[:1].upper() + w[1:])}</p>" for w in warnings)


def _shift_warning(counts: dict, thr: dict | None, alpha: float = 1e-3) -> list[str]:
    """A warning when the normal test images raise far more false alarms than the threshold allows for
    normal images like the ones it was fitted on (binomial tail below `alpha`)."""
    n_norm = counts["passed"] + counts["false_alarms"]
    if thr is None or not n_norm or thr.get("method", "quantile") != "quantile":
        return []
    rate = expected_false_alarm_rate(thr["n_normal"], thr["max_fpr"])
    tail = binomial_tail(counts["false_alarms"], n_norm, rate)
    if tail >= alpha:
        return []
    return [f"<p class=warn>{counts['false_alarms']} of {n_norm} normal test images are false alarms, where about "
            f"{rate * n_norm:.1g} were expected ({100 * rate:.2g} %) for normal images like the {thr['n_normal']} "
            f"the threshold was fitted on (chance of this many: {tail:.1g}). The normal test images score higher "
            "than the held-out normal images did, so they most likely differ from the images the detector "
            "learned (lighting, position, camera, another batch). Check that <code>train/good</code> and "
            "<code>test/good</code> come from the same process, or fit on good images that cover this "
            "variation.</p>"]


def _verdict_section(ev: dict) -> list[str]:
    v = verdicts(ev)
    parts = []
    counts = v["counts"]
    if counts is not None:
        n_anom, n_norm = counts["caught"] + counts["missed"], counts["passed"] + counts["false_alarms"]
        parts.append("<h3>Verdicts at the threshold</h3>")
        parts.append(f"<p>Anomalous test images caught: <b>{_pct(counts['caught'], n_anom)}</b>; missed: "
                     f"<b>{counts['missed']}</b>. Normal test images flagged (false alarms): "
                     f"<b>{_pct(counts['false_alarms'], n_norm)}</b>; correctly passed: "
                     f"<b>{counts['passed']}</b>.</p>")
        parts.append(counts_table(counts))
        parts.extend(_shift_warning(counts, ev.get("extra", {}).get("threshold")))
    elif ev.get("normalize"):
        parts.append("<p class=muted>Scores were min-max normalised on the test set: no verdicts at the "
                     "(raw-scale) threshold.</p>")
    if v["per_class"]:
        parts.append("<h3>Per defect type</h3><p class=muted>AUROC of each type's images against all normal "
                     "test images; recall = share of that type caught at the threshold.</p>")
        parts.append(per_type_table(v["per_class"]))
    if v["threshold"] is not None:
        missed, alarms = v["picks"]["missed"], v["picks"]["false_alarms"]
        parts.append("<h3>Missed anomalies</h3>")
        parts.append(_name_list(ev, missed) if missed else "<p>None missed: every anomalous test image scored "
                     "above the threshold.</p>" if counts and counts["caught"] else "<p>No anomalous test "
                     "images.</p>")
        parts.append("<h3>False alarms</h3>")
        parts.append(_name_list(ev, alarms) if alarms else "<p>No false alarms: every normal test image scored "
                     "at or below the threshold.</p>" if counts and counts["passed"] else "<p>No normal test "
                     "images.</p>")
    return parts


def _calibration_section(record: dict | None, config: dict, thr: dict | None, has_test: bool) -> list[str]:
    """The normal scores the threshold rests on (calibration.json); for a run without a test set, also what
    the page can and cannot tell."""
    from anomalab.report.figures import BASIS_WORDS

    if has_test and record is None:
        return []
    parts = ["<h3 id=calibration>Calibration: the normal images the threshold was fitted on</h3>"]
    if not has_test:
        parts.append("<p>This run has no test set (a folder of good images only), so misses and false alarms "
                     "cannot be counted here. What it shows is what normal looks like to the detector: the "
                     "scores of normal images it did not train on, and where the threshold sits among them. "
                     "To measure it, fit on a folder with the MVTec layout (<code>train/good</code>, "
                     "<code>test/good</code>, <code>test/&lt;defect&gt;</code>) or run "
                     "<code>anomalab evaluate RUN --data SPEC</code>.</p>")
        if thr is not None:
            parts.append(_threshold_note(thr, record))
    if record is not None and record["scores"]:
        s = np.asarray(record["scores"], dtype=float)
        basis = record.get("basis") or "holdout"
        row = {"normal images": len(s), "what they are": BASIS_WORDS.get(basis, basis), "min": float(s.min()),
               "median": float(np.median(s)), "95 %": float(np.quantile(s, 0.95)), "max": float(s.max())}
        if thr is not None:
            row["above threshold"] = int(np.sum(s > thr["value"]))
        parts.append(_table([row], list(row), " id=calibration-scores"))
    elif not has_test:
        n_cal = config.get("n_calibration")
        parts.append(f"<p class=muted>No calibration.json in this run; held-out images: "
                     f"{_fmt(n_cal) if n_cal is not None else 'unknown'}. The figures below were scored at fit "
                     "time.</p>")
    return parts


def run_summary(run: Path) -> dict:
    """Detector, data, metrics and counts at the threshold of one run folder, from its JSON records."""
    config = _read(run / "config.json") or {}
    ev = _read(run / "evaluation.json") or {}
    row = {"run": run_name(run), "detector": config.get("detector", ev.get("detector", "?")),
           "data": config.get("data", ev.get("dataset", "?"))}
    row.update(ev.get("metrics", {}))
    if ev:
        counts = verdicts(ev)["counts"]
        if counts:
            row.update(counts)
    return row


def write_report(runs: Sequence[str | Path], out: str | Path, title: str = "anomalab report") -> Path:
    """Write one HTML page summarising `runs` (folders with config.json / evaluation.json / *.png)."""
    runs = [Path(r) for r in runs]
    for r in runs:
        if not r.is_dir():
            raise RunFolderError(f"run folder not found: {r}")
    rows = [run_summary(r) for r in runs]
    metric_cols = [c for c in ("image_auroc", "aupr", "pixel_auroc", "aupro", "fpr_at_threshold",
                               "tpr_at_threshold", "caught", "missed", "false_alarms", "passed")
                   if any(c in row for row in rows)]
    summary = _table(rows, ["run", "detector", "data", *metric_cols],
                     headers=["run", "detector", "data", *[c.replace("_", " ") for c in metric_cols]])
    parts = [f"<h1>{html.escape(title)}</h1>", f"<div class=wide>{summary}</div>"]
    for run in runs:
        config = _read(run / "config.json") or {}
        ev = _read(run / "evaluation.json") or {}
        parts.append(f"<h2>{html.escape(run_name(run))}</h2>")
        if config:
            params = ", ".join(f"{k}={v}" for k, v in config.get("params", {}).items())
            parts.append(f"<p><b>{html.escape(str(config.get('detector', '')))}</b>({html.escape(params)}) "
                         f"on <code>{html.escape(str(config.get('data', '')))}</code>{_sizes(config)}.</p>")
            if config.get("command"):
                parts.append(f"<p class=muted>command: <code>{html.escape(config['command'])}</code></p>")
        record = read_calibration(run)
        thr = _threshold_of(run, ev, record)
        if ev:
            if thr is not None and ev.get("extra", {}).get("threshold"):
                parts.append(_threshold_note(thr, record))
            parts.extend(_verdict_section(ev))
        parts.extend(_calibration_section(record, config, thr, has_test=bool(ev)))
        figures = _figures(run)
        if figures:
            parts.append("<h3>Figures</h3>")
            parts.extend(figures)
        if ev and ev.get("timings"):
            timings = dict(ev["timings"])
            parts.append(f"<h3>Timings</h3><div class='wide muted'>{_table([timings], list(timings))}</div>")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    from anomalab.runs.atomic import write_file_atomic

    return write_file_atomic(out, page)
