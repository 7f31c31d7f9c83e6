"""Saved detectors and models: atomic saves, and loading that refuses every file `save` did not write."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import anomalab as al
import anomalab.detector as detector_mod
from anomalab.errors import LoadError, ParameterError, RunFolderError
from anomalab.generate.beta_vaegan import BetaVAE


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(24, 1, 8, 8, generator=g), torch.rand(6, 1, 8, 8, generator=g)


@pytest.fixture(scope="module")
def knn(data):
    train, _ = data
    det = al.create("knn", k=3).fit(train)
    det.fit_threshold(train[:8])
    return det


@pytest.fixture
def saved(knn, tmp_path):
    path = tmp_path / "det"
    knn.save(path)
    return path


def _meta(path):
    return json.loads((path / "detector.json").read_text())


def _write_meta(path, meta):
    (path / "detector.json").write_text(json.dumps(meta))


def _refused(path, file_name, match=None):
    with pytest.raises(LoadError, match=match) as info:
        al.load(path)
    message = str(info.value)
    assert file_name in message and "\n" not in message, message
    return message


def test_round_trip_keeps_scores_and_threshold(knn, saved, data):
    again = al.load(saved)
    assert torch.equal(again.score(data[1]), knn.score(data[1]))
    assert again.threshold_ == knn.threshold_
    assert sorted(p.name for p in saved.iterdir()) == ["detector.json", "weights.safetensors"]
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temporaries or locks left


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, "truncated"])
def test_truncated_or_garbage_weights(saved, content):
    weights = saved / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100] if content == "truncated" else content)
    _refused(saved, "weights.safetensors", "not a readable safetensors file")


@pytest.mark.parametrize("text, match", [
    ("[1, 2, 3]", "not a JSON object"),
    ('"detector"', "not a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_detector_json_that_is_not_an_object(saved, text, match):
    (saved / "detector.json").write_text(text)
    _refused(saved, "detector.json", match)


def test_detector_json_that_is_not_utf8(saved):
    (saved / "detector.json").write_bytes(b"\xff\xfe\x00garbage")
    _refused(saved, "detector.json", "not valid JSON")


@pytest.mark.parametrize("key, value, match", [
    ("params", [3], "params must be a JSON object"),
    ("params", {"k": "three"}, "k must be an integer"),
    ("params", {"k": 0}, "k must be a positive integer"),
    ("params", {"neighbours": 3}, "no parameter 'neighbours'"),
    ("input_shape", [1, 8], "input_shape must be 3 positive integers"),
    ("input_shape", [1, "8", 8], "input_shape"),
    ("input_shape", [1, 8.5, 8], "input_shape"),
    ("input_shape", [True, 8, 8], "input_shape"),
    ("input_shape", "1x8x8", "input_shape"),
    ("name", 3, "name must be a non-empty string"),
    ("fitted", ["history_"], "fitted must be a JSON object"),
    ("fitted", {"history_": [], "train_features_": [1.0]}, "fitted has unknown key"),
    ("threshold", {"value": 1.0}, "threshold"),
    ("threshold", {"value": 1.0, "max_fpr": 2.0, "n_normal": 3}, "max_fpr"),
    ("surprise", 1, "unknown key"),
])
def test_detector_json_with_wrong_types_or_keys(saved, key, value, match):
    meta = _meta(saved)
    meta[key] = value
    _write_meta(saved, meta)
    _refused(saved, "detector.json", match)


def test_nan_threshold(saved):
    text = (saved / "detector.json").read_text()
    meta = _meta(saved)
    old = json.dumps(meta["threshold"]["value"])
    (saved / "detector.json").write_text(text.replace(f'"value": {old}', '"value": NaN'))
    assert "NaN" in (saved / "detector.json").read_text()
    _refused(saved, "detector.json", "threshold value must be a finite number")


@pytest.mark.parametrize("extra", ["fitted.bogus_", "net.weight"])
def test_unexpected_tensor(saved, extra):
    tensors = load_file(str(saved / "weights.safetensors"))
    tensors[extra] = torch.zeros(2)
    save_file(tensors, str(saved / "weights.safetensors"))
    _refused(saved, "weights.safetensors", f"unexpected tensor.*{extra}")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(saved, bad):
    tensors = load_file(str(saved / "weights.safetensors"))
    tensors["fitted.train_features_"][0, 0] = bad
    save_file(tensors, str(saved / "weights.safetensors"))
    _refused(saved, "weights.safetensors", "NaN or infinite")


def test_weights_of_the_wrong_shape_for_the_networks(data, tmp_path):
    det = al.create("conv_ae", latent_dim=4, epochs=1, batch_size=8).fit(torch.rand(8, 1, 28, 28))
    det.save(tmp_path / "ae")
    meta = _meta(tmp_path / "ae")
    meta["params"]["latent_dim"] = 6
    _write_meta(tmp_path / "ae", meta)
    _refused(tmp_path / "ae", "weights.safetensors", "do not fit conv_ae")


def test_save_over_a_foreign_folder_is_refused_and_leaves_it_intact(knn, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    (foreign / "sub").mkdir()
    with pytest.raises(RunFolderError, match="no detector.json"):
        knn.save(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt", "sub"]
    assert (foreign / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file"):
        knn.save(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    knn.save(tmp_path / "empty")  # an empty folder is fine
    assert al.load(tmp_path / "empty").k == knn.k


def test_saving_again_replaces_the_detector_and_keeps_other_files(knn, saved, data):
    (saved / "notes.txt").write_text("kept")
    other = al.create("knn", k=5).fit(data[0])
    other.save(saved)
    assert (saved / "notes.txt").read_text() == "kept"
    assert al.load(saved).k == 5 and al.load(saved).threshold_ is None
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]


def test_a_failed_save_leaves_the_old_detector(knn, saved, data, monkeypatch):
    before = al.load(saved).score(data[1])
    real = detector_mod.save_file

    def write_then_fail(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(detector_mod, "save_file", write_then_fail)
    other = al.create("knn", k=7).fit(data[0])
    with pytest.raises(OSError, match="disk full"):
        other.save(saved)
    again = al.load(saved)
    assert again.k == knn.k and torch.equal(again.score(data[1]), before)
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # the temporary was removed


def test_knn_embedder_that_is_not_a_saved_detector(data, tmp_path):
    png = tmp_path / "image.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
    for target in (png, tmp_path / "nowhere"):
        with pytest.raises(LoadError, match="knn embedder") as info:
            al.create("knn", k=3, embedder=str(target)).fit(data[0])
        assert "\n" not in str(info.value)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "weights.safetensors").write_bytes(b"not safetensors at all")
    (garbage / "detector.json").write_text(json.dumps({"format_version": 1, "anomalab_version": al.__version__,
                                                       "name": "conv_ae", "params": {}, "input_shape": [1, 28, 28],
                                                       "threshold": None, "fitted": {"history_": []}}))
    with pytest.raises(LoadError, match=r"knn embedder.*weights\.safetensors"):
        al.create("knn", k=3, embedder=str(garbage)).fit(data[0])


def test_knn_embedder_that_cannot_embed(knn, saved, data, tmp_path):
    with pytest.raises(ParameterError, match="cannot embed"):
        al.create("knn", k=3, embedder=str(saved)).fit(data[0])
    ae = al.create("conv_ae", latent_dim=4, epochs=1, batch_size=8).fit(torch.rand(8, 1, 28, 28))
    ae.save(tmp_path / "ae")
    det = al.create("knn", k=3, embedder=str(tmp_path / "ae")).fit(data[0])
    det.save(tmp_path / "k")
    assert torch.equal(al.load(tmp_path / "k").score(data[1]), det.score(data[1]))
    (tmp_path / "ae" / "weights.safetensors").write_bytes(b"broken")
    with pytest.raises(LoadError, match=r"knn embedder.*ae.*weights\.safetensors"):
        al.load(tmp_path / "k")
    meta = _meta(tmp_path / "k")
    meta["params"]["embedder"] = str(saved)
    _write_meta(tmp_path / "k", meta)
    with pytest.raises(LoadError, match="cannot embed"):
        al.load(tmp_path / "k")


# ---- the beta-VAE(GAN) models (model.json) ---------------------------------------------------------
class _Noise:
    def sample(self, n, rng):
        return (torch.from_numpy(rng.random((n, 1, 64, 64), dtype=np.float32)),)


@pytest.fixture(scope="module")
def model():
    m = BetaVAE(latent_dim=2, steps=1, batch_size=2, seed=0)
    m.progress = False
    m.data_ = _Noise()
    m._start()
    m.train_more(1)  # so that there is optimiser state to save
    return m


def test_model_round_trip_and_atomic_save(model, tmp_path, monkeypatch):
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json", "optimizer.safetensors",
                                                                  "weights.safetensors"]
    before = BetaVAE.load(tmp_path / "m").encode(x)
    assert torch.equal(before, model.encode(x))
    (tmp_path / "m" / "time.json").write_text("{}")
    import anomalab.generate.beta_vaegan._base as base

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(base, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "m")
    monkeypatch.undo()
    assert torch.equal(BetaVAE.load(tmp_path / "m").encode(x), before)
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "time.json").read_text() == "{}"  # a file of the experiment's kept


def test_model_save_over_a_foreign_folder(model, tmp_path):
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "data.csv").write_text("a,b")
    with pytest.raises(RunFolderError, match="no model.json"):
        model.save(tmp_path / "f")
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["data.csv"]


@pytest.mark.parametrize("case, file_name, match", [
    ("garbage_weights", "weights.safetensors", "not a readable safetensors"),
    ("garbage_optimizer", "optimizer.safetensors", "not a readable safetensors"),
    ("stray_optimizer", "optimizer.safetensors", "unexpected tensor"),
    ("unknown_key", "model.json", "unknown key"),
    ("bad_param", "model.json", "latent_dim must be a positive integer"),
    ("bad_steps", "model.json", "steps_done"),
    ("nan_weights", "weights.safetensors", "NaN or infinite"),
])
def test_model_load_refuses_bad_files(model, tmp_path, case, file_name, match):
    path = tmp_path / "m"
    model.save(path)
    meta = json.loads((path / "model.json").read_text())
    if case == "garbage_weights":
        (path / "weights.safetensors").write_bytes(b"\0" * 7)
    elif case == "garbage_optimizer":
        (path / "optimizer.safetensors").write_bytes(b"xx")
    elif case == "stray_optimizer":
        save_file({"nobody.0.exp_avg": torch.zeros(2)}, str(path / "optimizer.safetensors"))
    elif case == "nan_weights":
        tensors = load_file(str(path / "weights.safetensors"))
        first = sorted(tensors)[0]
        tensors[first].view(-1)[0] = float("nan")
        save_file(tensors, str(path / "weights.safetensors"))
    else:
        if case == "unknown_key":
            meta["input_shape"] = [1, 64, 64]
        elif case == "bad_param":
            meta["params"]["latent_dim"] = -1
        else:
            meta["steps_done"] = "many"
        (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match=match) as info:
        BetaVAE.load(path)
    assert file_name in str(info.value) and "\n" not in str(info.value)
