"""The report page as a browser shows it: headless Chromium renders a fitted run's report.html; the
screenshot must not be blank and the rendered DOM must hold the counts and per-defect tables."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import cli
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason=f"{CHROMIUM} not installed (Debian: apt-get install chromium; `make test` "
                                       "installs it when run as root)")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--hide-scrollbars", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(mvtec_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "run"
    code, text = cli("fit", "knn", "k=3", "--data", mvtec_tree, "--out", out)
    assert code == 0, text
    return out / "report.html"


def screenshot(tmp_path: Path, page: Path) -> np.ndarray:
    shot = tmp_path / f"{page.stem}.png"
    result = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri())
    assert shot.is_file(), result.stderr[-2000:]
    return np.asarray(Image.open(shot).convert("L"))


def test_screenshot_is_not_blank(report, tmp_path):
    blank = tmp_path / "blank.html"  # negative control: the measure reads an empty page as blank
    blank.write_text("<!doctype html><html><body></body></html>")
    assert np.mean(screenshot(tmp_path, blank) < 240) < 0.001
    pixels = screenshot(tmp_path, report)
    assert pixels.shape == (2400, 1200)
    ink = float(np.mean(pixels < 240))
    assert ink > 0.03, f"only {ink:.1%} of the screenshot is not white"
    rows_with_ink = np.mean((pixels < 240).any(axis=1))
    assert rows_with_ink > 0.5, f"content in only {rows_with_ink:.0%} of the rows"  # images rendered, not just text


def test_dom_holds_the_counts_and_per_defect_tables(report, tmp_path):
    result = chromium(tmp_path, "--dump-dom", report.as_uri())
    dom = result.stdout
    assert "<table" in dom, result.stderr[-2000:]
    assert 'id="counts"' in dom and 'id="per-defect"' in dom
    assert "false alarms</td>" in dom and "caught</td>" in dom and "scratch" in dom
    assert dom.count("<img") >= 4 and "data:image/png;base64," in dom
