"""The served page in a real browser: `anomalab serve` in a subprocess on a free loopback port, headless
Chromium (Playwright driving the Debian chromium) uploads images through the file input and must show
each one's overlay, score and verdict; the threshold slider changes what the page decides, not the server.
A screenshot is saved in the test's tmp folder."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, write_png
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} not installed (Debian: apt-get install chromium; `make setup` installs it as root)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright; "
                               "it is in the dev extra)")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install anomalab[serve])")
expect = sync_api.expect  # waits through locators: the page's Content-Security-Policy forbids evaluated strings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tree(root: Path, size: int = 64, n_train: int = 24) -> Path:
    """Striped gray parts (MVTec layout): good ones, and ones with a bright diagonal scratch."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]

    def good():
        return 110 + 45 * np.sin((xx + 0.4 * yy) / 4 + rng.uniform(0, 6)) + rng.normal(0, 3, (size, size))

    for i in range(n_train):
        write_png(root / "train" / "good" / f"{i:03d}.png", good())
    for i in range(3):
        write_png(root / "test" / "good" / f"good_{i}.png", good())
        img = good()
        line = np.abs(yy - xx - (i - 1) * 8) <= 1.5
        line &= (xx > size // 5) & (xx < 4 * size // 5)
        img[line] = 255
        write_png(root / "test" / "scratch" / f"scratch_{i}.png", img)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tree(tmp_path_factory.mktemp("data") / "part")


@pytest.fixture(scope="module")
def server(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("served") / "run"
    code, text = cli("fit", "knn", "k=3", "--data", data, "--out", run, "--no-figures")
    assert code == 0, text
    port = free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "anomalab.cli", "serve", str(run), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, f"anomalab serve exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"anomalab serve did not start: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def test_upload_shows_overlay_score_and_verdict(server, browser, data, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(server + "/")
    expect(page.locator("#model")).to_contain_text("knn", timeout=30_000)
    scratches = sorted((data / "test" / "scratch").glob("*.png"))[:3]
    goods = sorted((data / "test" / "good").glob("*.png"))[:3]
    page.set_input_files("#files", [str(p) for p in [*goods, *scratches]])
    expect(page.locator(".card.done")).to_have_count(6, timeout=60_000)

    cards = page.locator(".card.done")
    verdicts = sorted(v.lower() for v in page.locator(".card.done .verdict").all_inner_texts())
    assert verdicts == ["anomalous"] * 3 + ["normal"] * 3  # the 3 scratches, the 3 good ones
    assert page.locator(".card.done.anomalous .score").count() == 3
    for i in range(6):
        src = cards.nth(i).locator("img").get_attribute("src")
        assert src.startswith("data:image/png;base64,")  # the server's overlay replaced the local preview
    assert "3 of 6 anomalous" in page.locator("#counts").inner_text()

    # the slider decides on the page only: at its top, every image is normal there, the saved verdicts stay
    slider = page.locator("#slider")
    slider.fill(slider.get_attribute("max"))
    assert page.locator("#counts").inner_text().startswith("0 of 6 anomalous")
    assert page.locator(".whatif.flip").count() == 3
    assert sorted(v.lower() for v in page.locator(".card.done .verdict").all_inner_texts()).count("anomalous") == 3
    page.click("#reset")
    assert "3 of 6 anomalous" in page.locator("#counts").inner_text()

    shot = tmp_path / "serve_page.png"
    page.screenshot(path=str(shot), full_page=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape[1] == 1100 and np.mean(pixels < 240) > 0.05  # rendered, not blank
    assert not errors, errors
    page.close()


def test_a_file_that_is_not_an_image_shows_why(server, browser, tmp_path):
    page = browser.new_page()
    page.goto(server + "/")
    expect(page.locator("#model")).to_contain_text("knn", timeout=30_000)
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    page.set_input_files("#files", [str(bad)])
    page.wait_for_selector(".card.error", timeout=30_000)
    assert "415" in page.locator(".card.error .verdict").inner_text()
    assert "notes.png is not an image" in page.locator(".card.error .detail").inner_text()
    page.close()
