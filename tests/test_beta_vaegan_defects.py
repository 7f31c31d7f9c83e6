"""The texture windows behind the defect beta-VAEGAN, the graded defects it learns from, and the
experiment end to end at a tiny budget (resumed without retraining)."""

import json

import numpy as np
import pytest
import torch

from anomalab.data.textures import TRAIN_FRACTION, TexturePatches, texture_photo
from anomalab.errors import ParameterError
from anomalab.experiments import beta_vaegan_defects as exp


def test_patches_are_box_shrunk_windows_of_the_photos_own_rows():
    photo = texture_photo("brick")
    split = int(round(photo.shape[0] * TRAIN_FRACTION))
    for part, rows in (("train", photo[:split]), ("test", photo[split:])):
        p = TexturePatches("brick", part, size=16, shrink=4)
        x, corners = p.sample(5, np.random.default_rng(0))
        assert x.shape == (5, 1, 16, 16)
        assert len(p) == (rows.shape[0] // 4 - 15) * (rows.shape[1] // 4 - 15)
        for img, (r, c) in zip(x, corners, strict=True):
            # recomputed independently: the 64 x 64 photo region averaged over 4 x 4 blocks
            region = rows[4 * r : 4 * r + 64, 4 * c : 4 * c + 64]
            expect = region.reshape(16, 4, 16, 4).mean((1, 3))
            np.testing.assert_allclose(img[0].numpy(), expect, atol=1e-6)
    rgb = TexturePatches("brick", "test", size=16, shrink=4, channels=3).sample(2, np.random.default_rng(0))[0]
    assert rgb.shape == (2, 3, 16, 16) and torch.equal(rgb[:, 0], rgb[:, 2])


def test_patches_refuse_bad_settings():
    for kw, msg in (({"part": "val"}, "part must be"), ({"channels": 2}, "channels must be"),
                    ({"size": 400}, "no 400 px window")):
        with pytest.raises(ParameterError, match=msg):
            TexturePatches("grass", **kw)


def test_defect_strength_blends_linearly_and_zero_is_the_clean_window():
    clean = TexturePatches("grass", "test").sample(3, np.random.default_rng(1))[0]
    full = exp.defective(clean, "intensity_shift", np.ones(3), np.random.default_rng(2))
    half = exp.defective(clean, "intensity_shift", np.full(3, 0.5), np.random.default_rng(2))
    none = exp.defective(clean, "intensity_shift", np.zeros(3), np.random.default_rng(2))
    assert full.shape == (3, 3, 64, 64)
    assert torch.allclose(none[:, :1], clean)
    changed = (full[:, :1] - clean).abs() > 1e-3  # pixels the defect moved without clipping
    assert changed.any()
    inside = changed & (full[:, :1] > 0) & (full[:, :1] < 1)
    torch.testing.assert_close(half[:, :1][inside], (clean + 0.5 * (full[:, :1] - clean))[inside])


def test_experiment_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(exp, "N_ADDED", 16)
    monkeypatch.setattr(exp, "N_TEST", 12)
    monkeypatch.setattr(exp, "N_DETECTOR", 40)
    monkeypatch.setitem(exp.STUDENT, "batch_size", 8)
    monkeypatch.setitem(exp.TEACHER, "batch_size", 8)
    args = ["--out", str(tmp_path), "--teacher-steps", "3", "--student-steps", "3", "--student-set", "w_adv=1",
            "--category", "brick"]
    exp.main(args)
    assert json.loads((tmp_path / "settings.json").read_text())["overrides"] == {"w_adv": 1.0}
    assert json.loads((tmp_path / "student_g1" / "model.json").read_text())["params"]["w_adv"] == 1.0
    rows = {r["stage"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert set(rows) == {"teacher", "student", "probe", "curve"}
    assert [r["degree"] for r in rows["curve"]["rows"]] == list(exp.DEGREES)
    assert rows["curve"]["rows"][0]["real_vs_clean"] == pytest.approx(0.5)  # strength 0 = the clean windows themselves
    lo, hi = rows["student"]["degree_range"]
    codes = [r["code"] for r in rows["curve"]["rows"]]
    assert codes[0] == pytest.approx(lo) and codes[-1] == pytest.approx(hi)  # degree 0 .. 1 spans the range
    for f in ("results.md", "samples.png", "degree_curve.png"):
        assert (tmp_path / f).stat().st_size > 0
    weights = (tmp_path / "student_g1" / "weights.safetensors").read_bytes()
    exp.main(args)  # a rerun trains nothing more and adds no row
    assert (tmp_path / "student_g1" / "weights.safetensors").read_bytes() == weights
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
    with pytest.raises(ParameterError, match="at least 1"):
        exp.main([*args[:2], "--teacher-steps", "0"])
    with pytest.raises(ParameterError, match="w_adv"):
        exp.main([*args[:2], "--student-set", "w_adv=lots"])
    with pytest.raises(ParameterError, match="other settings: category 'brick' \\(asked 'grass'\\)"):
        exp.main([*args[:-1], "grass"])  # the folder's rows belong to the brick run
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4
