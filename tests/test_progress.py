"""Progress displays (a bar on a terminal, log lines elsewhere) and the minimum training of small folders."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
from PIL import Image

import anomalab
from anomalab import progress as prog
from anomalab.train.loop import Batches, run_epochs


@pytest.fixture
def lines(monkeypatch, caplog):
    """Log lines of every step at once: no throttling, no minimum stage length."""
    monkeypatch.setattr(prog, "LINE_INTERVAL", 0.0)
    monkeypatch.setattr(prog, "MIN_STAGE_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="anomalab.progress")
    return caplog


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "anomalab.progress"]


def test_off_a_terminal_a_stage_is_one_log_line_and_nothing_on_stderr(lines, capsys):
    assert list(prog.progress(range(5), "extract", unit="batch")) == [0, 1, 2, 3, 4]
    assert len(_messages(lines)) == 1 and _messages(lines)[0].startswith("extract: done, 5/5 batches")
    assert capsys.readouterr().err == ""


def test_off_a_terminal_training_is_one_line_per_epoch(lines, capsys):
    loader = Batches(torch.arange(10.0)[:, None], batch_size=4, shuffle=False)
    history = run_epochs(lambda b: {"loss": float(b.sum())}, loader, epochs=3, desc="toy fit")
    messages = _messages(lines)
    assert [m.split(" (")[0] for m in messages] == [f"toy fit: epoch {i}/3 loss=15" for i in (1, 2, 3)]
    assert capsys.readouterr().err == ""
    lines.clear()
    assert run_epochs(lambda b: {"loss": float(b.sum())}, loader, epochs=3, progress=False) == history
    assert _messages(lines) == []


def test_throttled_lines_keep_the_last_epoch(monkeypatch, caplog):
    monkeypatch.setattr(prog, "LINE_INTERVAL", 3600.0)
    caplog.set_level(logging.INFO, logger="anomalab.progress")
    run_epochs(lambda b: {"loss": 1.0}, Batches(torch.zeros(4, 1), 2), epochs=5, desc="toy")
    assert [m.split(" (")[0] for m in _messages(caplog)] == ["toy: epoch 5/5 loss=1"]


def test_on_a_terminal_a_bar_and_no_log_lines(monkeypatch, lines):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    monkeypatch.setattr("sys.stderr", stream)
    monkeypatch.setattr(prog, "BAR_DELAY", 0.0)
    assert prog.on_terminal()
    run_epochs(lambda b: {"loss": 1.0}, Batches(torch.zeros(4, 1), 2), epochs=2, desc="toy bar")
    assert "toy bar" in stream.getvalue() and _messages(lines) == []


def test_disabled_shows_nothing(lines, capsys):
    assert list(prog.progress([1, 2], "quiet", enabled=False)) == [1, 2]
    assert _messages(lines) == [] and capsys.readouterr().err == ""


def test_scoring_a_folder_reports_its_files(lines, tmp_path):
    from anomalab.scoring import iter_scores

    det = anomalab.create("knn", k=1).fit(torch.rand(4, 1, 8, 8))
    files = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray((torch.rand(8, 8) * 255).byte().numpy()).save(path)
        files.append(path)
    rows = list(iter_scores(det, files, chunk=2))
    assert len(rows) == 3
    assert any(m.startswith("knn score: done, 3/3 files") for m in _messages(lines))
    lines.clear()
    assert [r["score"] for r in iter_scores(det, files, chunk=2, progress=False)] == [r["score"] for r in rows]
    assert _messages(lines) == []


def test_gaussian_fit_reports_its_feature_extraction(lines):
    det = anomalab.create("gaussian", image_size=32, patch_levels=None, batch_size=2)
    det.fit(torch.rand(4, 3, 32, 32))
    assert any(m.startswith("gaussian features: done, 2/2 batches") for m in _messages(lines))


# ---- minimum training on small folders ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["conv_ae", "vae", "anogan", "egbad", "ganomaly", "skip_ganomaly"])
def test_default_epochs_reach_min_steps_on_small_folders(name):
    det = anomalab.create(name)
    per_epoch = math.ceil(60 / det.batch_size)
    assert det.min_steps == 500
    assert det.fit_epochs(60) == math.ceil(500 / per_epoch) > det.epochs  # ~20 steps -> 500
    assert det.fit_epochs(3600) == det.epochs  # MNIST's ~3,600 normal digits: the paper's epochs


def test_explicit_epochs_are_kept_with_a_warning_that_names_the_fix(caplog):
    caplog.set_level(logging.INFO, logger="anomalab.train.epochs")
    det = anomalab.create("vae", epochs=20)
    assert det.fit_epochs(60) == 20
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "20 optimisation steps" in warning[0].getMessage()
    assert "pass epochs=500" in warning[0].getMessage()
    caplog.clear()
    assert anomalab.create("vae", epochs=30).fit_epochs(4000) == 30 and caplog.records == []


def test_fit_trains_the_extended_epochs_only_when_epochs_is_left_out(tiny_case):
    train, _ = tiny_case  # 48 images
    auto = anomalab.create("conv_ae", latent_dim=4, batch_size=16)
    auto.progress = False
    auto.min_steps = 12  # 48 images at batch 16: 3 steps per epoch, so 4 epochs reach 12 steps
    auto.epochs = 2  # set after construction: still the default as far as the rule is concerned
    auto.fit(train)
    assert len(auto.history_) == 4
    explicit = anomalab.create("conv_ae", latent_dim=4, batch_size=16, epochs=2)
    explicit.progress = False
    explicit.min_steps = 12
    explicit.fit(train)
    assert len(explicit.history_) == 2
    same = anomalab.create("conv_ae", latent_dim=4, batch_size=16, epochs=2)
    same.progress = False
    same.fit(train)  # min_steps 500: still 2 epochs, and the same networks as under any min_steps
    assert torch.equal(same.score(train.images), explicit.score(train.images))


def test_loaded_detectors_keep_their_saved_epochs(tmp_path, tiny_case):
    train, _ = tiny_case
    det = anomalab.create("conv_ae", latent_dim=4, batch_size=16, epochs=1)
    det.progress = False
    det.fit(train)
    det.save(tmp_path / "d")
    assert anomalab.load(tmp_path / "d").fit_epochs(48) == 1
