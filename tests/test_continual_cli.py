"""`anomalab fit --continue-from RUN --strategy S`: a saved detector learns a new folder of normal images."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from anomalab.cli import main
from anomalab.registry import load

TINY = ["epochs=1", "latent_dim=4", "batch_size=8"]


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def folders(mnist, tmp_path_factory):
    """Two plain folders of good images: 24 real '1's, then 24 real '2's (28x28 PNG)."""
    root = tmp_path_factory.mktemp("tasks")
    out = []
    for d in (1, 2):
        folder = root / f"digit{d}"
        folder.mkdir()
        idx = np.flatnonzero(mnist.classes.numpy() == d)[:24]
        for i, k in enumerate(idx):
            pixels = (mnist.images[k, 0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
        out.append(folder)
    return out


def fit(*args):
    result = CliRunner().invoke(main, ["fit", *args, "--no-figures"])
    return result


@pytest.fixture(scope="module")
def first_run(folders, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "task1"
    result = fit("vae", *TINY, "--data", str(folders[0]), "--out", str(run))
    assert result.exit_code == 0, result.output
    return run


def test_replay_update_writes_a_new_run_and_leaves_the_old_one_untouched(folders, first_run, tmp_path):
    before = digest(first_run)
    new = tmp_path / "task2"
    result = fit("vae", "--data", str(folders[1]), "--out", str(new), "--continue-from", str(first_run),
                 "--strategy", "replay")
    assert result.exit_code == 0, result.output
    assert digest(first_run) == before
    config = json.loads((new / "config.json").read_text())
    assert config["continual"]["strategy"] == "replay"
    assert config["continual"]["data_history"] == [str(folders[0]), str(folders[1])]
    meta = json.loads((new / "continual.json").read_text())
    assert meta["strategy"] == "replay" and len(meta["tasks"]) == 2
    old_det, new_det = load(first_run), load(new)
    assert new_det.threshold_ is not None
    assert len(new_det.history_) == 2 * len(old_det.history_)  # one more task of the same epochs
    x = old_det.sample(4).clamp(0, 1)
    assert not np.allclose(old_det.score(x).numpy(), new_det.score(x).numpy())


@pytest.mark.parametrize("strategy", ["ewc", "joint"])
def test_ewc_and_joint_reload_the_earlier_data_from_the_recorded_specs(folders, first_run, tmp_path,
                                                                       strategy):
    new = tmp_path / strategy
    result = fit("vae", "--data", str(folders[1]), "--out", str(new), "--continue-from", str(first_run),
                 "--strategy", strategy, *(["fisher_samples=4"] if strategy == "ewc" else []))
    assert result.exit_code == 0, result.output
    if strategy == "ewc":  # the Fisher travels with the run, so the next update needs no old data
        from safetensors.torch import load_file

        assert any(k.startswith("fisher.") for k in load_file(str(new / "continual.safetensors")))


def test_clear_errors(folders, first_run, tmp_path):
    result = fit("vae", "--data", str(folders[1]), "--out", str(tmp_path / "x"), "--strategy", "replay")
    assert result.exit_code == 2 and "--continue-from" in result.output
    result = fit("conv_ae", "--data", str(folders[1]), "--out", str(tmp_path / "y"),
                 "--continue-from", str(first_run))
    assert result.exit_code == 2 and "'vae' detector, not 'conv_ae'" in result.output
    result = fit("vae", "--data", str(folders[1]), "--out", str(first_run), "--continue-from", str(first_run))
    assert result.exit_code == 2 and "new run folder" in result.output
    result = fit("vae", "latent_dim=16", "--data", str(folders[1]), "--out", str(tmp_path / "w"),
                 "--continue-from", str(first_run), "--strategy", "ewc")
    assert result.exit_code == 2 and "['latent_dim'] cannot change" in result.output
    conv = tmp_path / "conv"
    assert fit("conv_ae", *TINY, "--data", str(folders[0]), "--out", str(conv)).exit_code == 0
    result = fit("conv_ae", "--data", str(folders[1]), "--out", str(tmp_path / "z"),
                 "--continue-from", str(conv), "--strategy", "replay")
    assert result.exit_code == 2 and "no prior to sample from" in result.output


def test_folder_sequence_reads_one_task_per_folder(folders):
    from anomalab.continual import folder_sequence

    seq = folder_sequence(folders)
    assert seq.names == ["digit1", "digit2"] and [len(t) for t in seq.tasks] == [24, 24]
    assert seq.tasks[0].shape == (1, 28, 28)
    with pytest.raises(ValueError, match="no held-out test images"):
        seq.test_after(0)
