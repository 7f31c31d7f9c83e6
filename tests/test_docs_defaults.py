"""The defaults in the parameter tables of docs/detectors/*.md are the code's defaults (`__init__`)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from anomalab.registry import detector_class, list_detectors

DOCS = Path(__file__).resolve().parents[1] / "docs" / "detectors"


def split_values(cell: str) -> list[str]:
    """'8, "cpu"' -> ['8', '"cpu"'], commas inside brackets and quotes kept."""
    out, depth, cur, quote = [], 0, "", None
    for ch in cell:
        if quote:
            cur += ch
            quote = None if ch == quote else quote
            continue
        if ch in "\"'":
            quote = ch
        depth += (ch in "([") - (ch in ")]")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    return [*out, cur.strip()]


def value(text: str):
    for candidate in (text, re.sub(r"\s*\(.*\)$", "", text)):  # "None (= 1..9)": the value before the note
        try:
            return ast.literal_eval(candidate.replace("−", "-"))
        except (ValueError, SyntaxError):
            continue
    return text


def norm(v):
    if isinstance(v, (list, tuple)):
        return tuple(norm(x) for x in v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return v


def documented_defaults(text: str) -> list[tuple[str, str]]:
    """(parameter, documented default) of every table row with a 'default' column and as many
    backticked names in its first cell as values in that column."""
    rows, header = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set(line) <= set("|-: ") or "default" not in header:
            continue
        names = re.findall(r"`([a-z_0-9]+)`", cells[0])
        if "(" in cells[0].replace("`", ""):  # "`kl_weight` (vae)": one detector's row, checked below too
            names = names[:1]
        values = split_values(cells[header.index("default")])
        if names and len(names) == len(values):
            rows += list(zip(names, values, strict=True))
    return rows


def pages():
    """(detector, its page): docs/detectors/NAME.md, conv_ae and vae sharing conv_ae_vae.md."""
    for det in list_detectors():
        page = DOCS / ("conv_ae_vae.md" if det in ("conv_ae", "vae") else f"{det}.md")
        if page.is_file():
            yield det, page


@pytest.mark.parametrize("det, page", list(pages()), ids=lambda x: str(getattr(x, "name", x)))
def test_documented_defaults_are_the_code_defaults(det, page):
    sig = inspect.signature(detector_class(det).__init__).parameters
    rows = [(n, v) for n, v in documented_defaults(page.read_text()) if n in sig]
    assert rows, f"{page.name} documents no default of {det}"
    wrong = [(n, v, sig[n].default) for n, v in rows if norm(value(v)) != norm(sig[n].default)]
    assert not wrong, f"{page.name}: documented vs code default: {wrong}"


def test_a_wrong_default_is_caught():
    text = "| parameter | default | meaning |\n|---|---|---|\n| `batch_size`, `device` | 32, \"cpu\" | |\n"
    sig = inspect.signature(detector_class("gaussian").__init__).parameters
    rows = documented_defaults(text)
    assert rows == [("batch_size", "32"), ("device", '"cpu"')]
    assert norm(value(rows[0][1])) != norm(sig["batch_size"].default)
