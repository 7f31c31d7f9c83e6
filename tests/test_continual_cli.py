"""`anomalab fit --continue-from RUN --strategy S`: a saved detector learns a new folder of normal images.

Every update is checked on what the new run folder records (config.json's `continual` section,
continual.json, the strategy's saved state in continual.safetensors), on what the update trained on
(a spy on the detector's `train_more`), on what the strategy promises (ewc holds the weights that
mattered for the old task, joint trains on both tasks) and on the old run staying byte-identical."""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from anomalab.cli import main
from anomalab.continual import diagonal_fisher
from anomalab.continual.strategies import Replay, trainable_parameters
from anomalab.data.transforms import prepare
from anomalab.detectors._autoencoder import ReconstructionDetector
from anomalab.registry import load

TINY = ["epochs=1", "latent_dim=4", "batch_size=8"]
N_FIT = 22  # 24 images per folder, round(0.1 * 24) = 2 held out for the threshold (calib_frac 0.1)
EWC = ["fisher_samples=8", "ewc_lambda=1e6"]


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read_pngs(folder) -> torch.Tensor:
    """The folder's images read here with PIL, independently of anomalab's loader: (N, 1, 28, 28)."""
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p), np.float32) / 255)[None]
                        for p in sorted(folder.glob("*.png"))])


def rows_in(rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """(len(rows),) bool: is each image of `rows` one of the images of `pool`?"""
    d = (rows.flatten(1)[:, None] - pool.flatten(1)[None]).abs().amax(-1)
    return d.min(1).values < 1e-6


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
    return CliRunner().invoke(main, ["fit", *args, "--no-figures"])


@contextmanager
def spy_training():
    """Record every tensor the update trains on and every (real, extended) batch length of replay."""
    seen = {"data": [], "batches": []}
    train_more, extend = ReconstructionDetector.train_more, Replay.extend_batch

    def recording_train_more(self, x, *args, **kwargs):
        seen["data"].append(x.detach().cpu().clone())
        return train_more(self, x, *args, **kwargs)

    def recording_extend(self, batch):
        out = extend(self, batch)
        seen["batches"].append((len(batch), out[len(batch):].detach().cpu().clone()))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ReconstructionDetector, "train_more", recording_train_more)
        mp.setattr(Replay, "extend_batch", recording_extend)
        yield seen


@pytest.fixture(scope="module")
def first_run(folders, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "task1"
    result = fit("vae", *TINY, "--data", str(folders[0]), "--out", str(run))
    assert result.exit_code == 0, result.output
    assert "continual" not in json.loads((run / "config.json").read_text())  # a plain fit
    return run, digest(run)


def update(first_run, folder, out, strategy, *params):
    """Continue `first_run` on `folder` with `strategy`; check the old run is untouched; return
    (new run, its config's continual section, what the update trained on)."""
    old, old_digest = first_run
    with spy_training() as seen:
        result = fit("vae", *params, "--data", str(folder), "--out", str(out), "--continue-from", str(old),
                     "--strategy", strategy)
    assert result.exit_code == 0, result.output
    assert digest(old) == old_digest  # every file of the old run byte-identical
    return out, json.loads((out / "config.json").read_text())["continual"], seen


def check_records(new, continual, first_run, folders, strategy, strategy_params):
    old, _ = first_run
    history = [str(folders[0]), str(folders[1])]
    assert continual["strategy"] == strategy and continual["strategy_params"] == strategy_params
    assert continual["continued_from"] == str(old) and continual["data_history"] == history
    if "tasks" in continual:  # per-task records (spec + calibration split), where the code keeps them
        assert [t["data"] for t in continual["tasks"]] == history
    meta = json.loads((new / "continual.json").read_text())
    assert meta == {"strategy": strategy, "strategy_params": strategy_params,
                    "tasks": ["(initial fit)", str(folders[1])]}
    old_det, new_det = load(old), load(new)
    assert new_det.threshold_ is not None
    assert len(new_det.history_) == 2 * len(old_det.history_)  # one more task of the same epochs
    assert new_det.get_params() == old_det.get_params()


@pytest.fixture(scope="module")
def ewc_run(folders, first_run, tmp_path_factory):
    return update(first_run, folders[1], tmp_path_factory.mktemp("ewc") / "run", "ewc", *EWC)


@pytest.fixture(scope="module")
def finetune_run(folders, first_run, tmp_path_factory):
    return update(first_run, folders[1], tmp_path_factory.mktemp("finetune") / "run", "finetune")


def test_replay_trains_on_the_new_task_plus_decoded_images(folders, first_run, tmp_path):
    new, continual, seen = update(first_run, folders[1], tmp_path / "task2", "replay")
    check_records(new, continual, first_run, folders, "replay", {"replay_fraction": 0.5})
    assert load_file(str(new / "continual.safetensors")) == {}  # replay keeps nothing between tasks
    # trained on the new task's fit images only ...
    (data,) = seen["data"]
    assert len(data) == N_FIT and rows_in(data, read_pngs(folders[1])).all()
    # ... with every real batch extended by batch_size / 2 images decoded by the OLD run's decoder from
    # z ~ N(0, I) (the strategy's generator, seeded seed * 1000 + task index 1)
    assert len(seen["batches"]) == -(-N_FIT // 8)
    old_det, new_det = load(first_run[0]), load(new)
    decoder, g = old_det.decoder_.eval(), torch.Generator().manual_seed(old_det.seed * 1000 + 1)
    for n_real, replayed in seen["batches"]:
        assert n_real <= 8 and len(replayed) == 4
        with torch.no_grad():
            torch.testing.assert_close(replayed, decoder(torch.randn(4, old_det.latent_dim, generator=g)))
    with torch.no_grad():  # negative control: the updated decoder would have replayed other images
        z = torch.randn(4, old_det.latent_dim, generator=g.manual_seed(old_det.seed * 1000 + 1))
        assert not torch.allclose(new_det.decoder_.eval()(z), seen["batches"][0][1], atol=1e-3)
    x = old_det.sample(4).clamp(0, 1)
    assert not np.allclose(old_det.score(x).numpy(), new_det.score(x).numpy())


def test_ewc_saves_the_summed_fisher_of_both_tasks(folders, first_run, ewc_run):
    """continual.safetensors holds one Fisher tensor per trainable parameter, equal to an independent
    recomputation: the old detector's Fisher on the old task's fit images (computed once, as the old run
    was a plain fit) plus the updated detector's Fisher on the new task's fit images."""
    new, continual, seen = ewc_run
    check_records(new, continual, first_run, folders, "ewc",
                  {"ewc_lambda": 1e6, "fisher_samples": 8, "fisher_decay": 1.0})
    (data,) = seen["data"]  # ewc trains on the new images only
    assert len(data) == N_FIT and rows_in(data, read_pngs(folders[1])).all()
    state = load_file(str(new / "continual.safetensors"))
    old_det, new_det = load(first_run[0]), load(new)
    params = trainable_parameters(new_det)
    assert set(state) == {"tasks_done", *(f"fisher.{k}" for k in params)}
    assert int(state["tasks_done"]) == 2
    fisher = {k: state[f"fisher.{k}"] for k in params}
    assert all(fisher[k].shape == p.shape and (fisher[k] >= 0).all() for k, p in params.items())
    assert sum(float(f.sum()) for f in fisher.values()) > 0

    from anomalab.data.specs import load_spec
    from anomalab.runs.fit import calibration_split

    def fit_images(folder, det):
        train = calibration_split(load_spec(str(folder))[0], 0.1, seed=det.seed)[0]
        return prepare(train.images, det.input_shape_)

    f_old = diagonal_fisher(old_det, fit_images(folders[0], old_det), 8, seed=old_det.seed)
    f_new = diagonal_fisher(new_det, fit_images(folders[1], new_det), 8, seed=new_det.seed + 1)
    for k in params:
        torch.testing.assert_close(fisher[k], f_old[k] + f_new[k], rtol=1e-4, atol=1e-8)
    # negative control: the new task's Fisher alone is not what was saved
    assert not all(torch.allclose(fisher[k], f_new[k], rtol=1e-3) for k in params)


def test_ewc_holds_the_old_tasks_weights_closer_than_finetune(folders, first_run, ewc_run, finetune_run):
    """With a large lambda, the Fisher-weighted distance of the updated weights from the old ones (the
    quantity EWC penalises; Fisher of the old detector on all 24 old images, computed here) is far
    smaller after ewc than after finetune, while both updates did change the weights."""
    new_f, continual_f, seen_f = finetune_run
    check_records(new_f, continual_f, first_run, folders, "finetune", {})
    assert load_file(str(new_f / "continual.safetensors")) == {}
    (data,) = seen_f["data"]
    assert len(data) == N_FIT and rows_in(data, read_pngs(folders[1])).all()

    old_det = load(first_run[0])
    anchor = {k: p.detach().clone() for k, p in trainable_parameters(old_det).items()}
    fisher = diagonal_fisher(old_det, read_pngs(folders[0]), n_samples=24, seed=7)
    moved = {}
    for name, run in (("finetune", new_f), ("ewc", ewc_run[0])):
        after = trainable_parameters(load(run))
        moved[name] = sum(float((fisher[k] * (after[k].detach() - anchor[k]).pow(2)).sum()) for k in anchor)
        assert any(not torch.equal(after[k], anchor[k]) for k in anchor), name
    assert moved["finetune"] > 0
    assert moved["ewc"] < 0.1 * moved["finetune"], moved  # seed 0: about 0.025


def test_joint_trains_on_both_tasks_reloaded_from_the_recorded_spec(folders, first_run, tmp_path):
    new, continual, seen = update(first_run, folders[1], tmp_path / "joint", "joint")
    check_records(new, continual, first_run, folders, "joint", {"equal_steps": False})
    assert load_file(str(new / "continual.safetensors")) == {}  # joint's images are never copied
    (data,) = seen["data"]
    assert len(data) == 2 * N_FIT
    one, two = rows_in(data, read_pngs(folders[0])), rows_in(data, read_pngs(folders[1]))
    assert int(one.sum()) == N_FIT and int(two.sum()) == N_FIT and (one | two).all()


def test_a_second_ewc_update_needs_only_the_saved_fisher(folders, first_run, ewc_run, tmp_path):
    """Continue the ewc run once more after its recorded data specs became unreadable: ewc reads its
    Fisher from continual.safetensors and succeeds; joint, which needs the old images, fails clearly."""
    moved = tmp_path / "ewc_copy"
    shutil.copytree(ewc_run[0], moved)
    config = json.loads((moved / "config.json").read_text())
    gone = [str(tmp_path / "gone1"), str(tmp_path / "gone2")]
    config["data"], config["continual"]["data_history"] = gone[1], gone
    for task, spec in zip(config["continual"].get("tasks", []), gone, strict=True):
        task["data"] = spec
    (moved / "config.json").write_text(json.dumps(config))
    before = digest(moved)
    third = tmp_path / "task3"
    with spy_training() as seen:
        result = fit("vae", "--data", str(folders[0]), "--out", str(third), "--continue-from", str(moved))
    assert result.exit_code == 0, result.output
    assert digest(moved) == before
    continual = json.loads((third / "config.json").read_text())["continual"]
    assert continual["strategy"] == "ewc"  # the old run's strategy is the default
    assert continual["strategy_params"]["ewc_lambda"] == 1e6  # ... with its parameters
    assert continual["data_history"] == [str(tmp_path / "gone1"), str(tmp_path / "gone2"), str(folders[0])]
    assert len(seen["data"]) == 1 and len(seen["data"][0]) == N_FIT
    state = load_file(str(third / "continual.safetensors"))
    assert int(state["tasks_done"]) == 3
    saved = load_file(str(moved / "continual.safetensors"))
    grew = [bool((state[k] >= saved[k] - 1e-12).all()) for k in saved if k.startswith("fisher.")]
    assert all(grew)  # F <- F + F_new with fisher_decay 1: never smaller
    result = fit("vae", "--data", str(folders[0]), "--out", str(tmp_path / "joint3"),
                 "--continue-from", str(moved), "--strategy", "joint")
    assert result.exit_code == 2 and "not found" in result.output and "gone1" in result.output
    assert not (tmp_path / "joint3" / "config.json").exists()


def test_clear_errors(folders, first_run, tmp_path):
    old, old_digest = first_run
    result = fit("vae", "--data", str(folders[1]), "--out", str(tmp_path / "x"), "--strategy", "replay")
    assert result.exit_code == 2 and "--continue-from" in result.output
    result = fit("conv_ae", "--data", str(folders[1]), "--out", str(tmp_path / "y"),
                 "--continue-from", str(old))
    assert result.exit_code == 2 and "'vae' detector, not 'conv_ae'" in result.output
    result = fit("vae", "--data", str(folders[1]), "--out", str(old), "--continue-from", str(old))
    assert result.exit_code == 2 and result.output.startswith("error:") and "--out" in result.output
    result = fit("vae", "latent_dim=16", "--data", str(folders[1]), "--out", str(tmp_path / "w"),
                 "--continue-from", str(old), "--strategy", "ewc")
    assert result.exit_code == 2 and "['latent_dim'] cannot change" in result.output
    assert digest(old) == old_digest
    assert not any((tmp_path / d).exists() for d in ("x", "y", "w"))
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
    torch.testing.assert_close(seq.tasks[1].images, read_pngs(folders[1]))  # same images, same order
    with pytest.raises(ValueError, match="no held-out test images"):
        seq.test_after(0)
