"""The continual_mnist experiment's data protocol and source setting: a validation split that no reported
seed trains or tests on, the 60k/10k IDX split through --mnist-root (on a tiny IDX tree of real digits
written here), the source's fully-connected VAE with the mean |x - x_hat| score, and reconstructions
kept after intermediate tasks. Image identity is checked by content (the bytes of each image)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from conftest import cli

from anomalab.experiments import continual_mnist
from anomalab.registry import create, load


def keys(images: torch.Tensor) -> set[bytes]:
    """Each image's 8-bit pixels as bytes (the digits are 8-bit, so this is exact)."""
    pixels = (images.flatten(1) * 255).round().to(torch.uint8).numpy()
    return {row.tobytes() for row in pixels}


@pytest.fixture(autouse=True)
def packaged_once(mnist, monkeypatch):
    """load_mnist() answered by the session's copy of the packaged digits (parsing them takes seconds)."""
    import anomalab.data.mnist as module

    original = module.load_mnist
    monkeypatch.setattr(module, "load_mnist", lambda root=None, split="all": mnist if root is None
                        else original(root, split))


def seq_images(seq):
    train = set().union(*(keys(t.images) for t in seq.tasks))
    test = set().union(*(keys(t.images) for t in seq.tests)) | keys(seq.anomalies.images)
    return train, test


def test_validation_images_are_outside_every_seeds_training_and_test_images(mnist):
    val_args = continual_mnist.parse_args(["--validate"])
    test_args = continual_mnist.parse_args([])
    val_train, val = seq_images(continual_mnist.make_sequence(val_args, 100))
    assert len(val) == 500  # 50 per digit, the zeros included
    # the same validation images whatever the seed
    assert seq_images(continual_mnist.make_sequence(val_args, 7))[1] == val
    for seed in (0, 1, 2):
        seq = continual_mnist.make_sequence(test_args, seed)
        train, test = seq_images(seq)
        assert not (val & train) and not (val & test) and not (train & test)
        assert [len(t) for t in seq.tasks] == [360] * 9 and [len(t) for t in seq.tests] == [90] * 9
        assert len(seq.anomalies) == 450 and (seq.anomalies.classes == 0).all()
    # validation mode trains on the seed's own training images, tests on the validation images only
    assert val_train == seq_images(continual_mnist.make_sequence(test_args, 100))[0]
    # negative control: what the old protocol did, a seed's test set drawn from everything, meets the
    # validation images
    from anomalab.continual import mnist_digit_sequence
    assert val & seq_images(mnist_digit_sequence(mnist, test_frac=0.2, seed=0))[1]


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def idx_root(mnist, tmp_path_factory):
    """A tiny MNIST IDX tree of real digits: 20 training and 4 test images per digit (gzipped files)."""
    root = tmp_path_factory.mktemp("mnist_idx")
    classes = mnist.classes.numpy()
    train = np.concatenate([np.flatnonzero(classes == d)[:20] for d in range(10)])
    test = np.concatenate([np.flatnonzero(classes == d)[20:24] for d in range(10)])
    for stem, idx in (("train", train), ("t10k", test)):
        pixels = (mnist.images[idx, 0].numpy() * 255).round()
        write_idx(root / f"{stem}-images-idx3-ubyte.gz", pixels)
        write_idx(root / f"{stem}-labels-idx1-ubyte.gz", classes[idx])
    return root, mnist.images[train], mnist.images[test]


def test_mnist_root_trains_on_the_training_files_and_tests_on_the_test_files(idx_root):
    root, train_images, test_images = idx_root
    seq = continual_mnist.make_sequence(continual_mnist.parse_args(["--mnist-root", str(root)]), 0)
    train, test = seq_images(seq)
    digits = keys(train_images)
    assert train <= digits and len(train) == 9 * 20  # every training image of digits 1..9
    assert test == keys(test_images) and len(seq.anomalies) == 4
    val_seq = continual_mnist.make_sequence(continual_mnist.parse_args(["--mnist-root", str(root), "--validate"]), 0)
    val_train, val = seq_images(val_seq)
    assert len(val) == 10 * 2 and val <= digits and not (val & val_train)  # 10 % of each digit held out
    assert not (val & keys(test_images))


def test_mlp_vae_with_l1_score(mnist, tmp_path):
    ones = mnist.images[mnist.classes == 1][:64]
    det = create("vae", arch="mlp", latent_dim=6, error="l1", epochs=2, batch_size=16, lr=1e-3).fit(ones)
    n_params = sum(p.numel() for n in det._nets().values() for p in n.parameters())
    enc = 784 * 400 + 400 + 400 * 200 + 200 + 2 * (200 * 6 + 6)
    dec = 6 * 200 + 200 + 200 * 400 + 400 + 400 * 784 + 784
    assert n_params == enc + dec  # the fully-connected 784-400-200-z VAE, mirrored
    x = mnist.images[:10]
    scores = det.score(x)
    expected = (x - det.reconstruct(x)).abs().flatten(1).mean(1)
    torch.testing.assert_close(scores, expected)
    mse = create("vae", arch="mlp", latent_dim=6, epochs=2, batch_size=16, lr=1e-3).fit(ones)
    assert not torch.allclose(mse.score(x), scores)  # negative control: the MSE score differs
    det.save(tmp_path / "v")
    torch.testing.assert_close(load(tmp_path / "v").score(x), scores)
    assert det.sample(3).shape == (3, 1, 28, 28)


def test_source_setting_run_on_an_idx_tree(idx_root, tmp_path):
    root, _, _ = idx_root
    out = tmp_path / "run"
    code, text = cli("experiment", "continual_mnist", "--source-setting", "--mnist-root", root, "--epochs", 1,
                     "--batch-size", 8, "--strategies", "replay", "finetune", "--seeds", 0, "--show-after", 2, 5,
                     "--out", out)
    assert code == 0, text
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["strategy"] for r in rows} == {"replay", "finetune"}
    for r in rows:
        assert r["settings"]["arch"] == "mlp" and r["settings"]["error"] == "l1"
        assert r["settings"]["latent_dim"] == 200 and r["settings"]["lr"] == 1e-3
        assert r["n_train_per_task"] == [20] * 9 and r["n_test_normal_per_task"] == [4] * 9
        assert r["split"] == "test set" and len(r["auroc"]) == 9
    for s in ("replay", "finetune"):
        for t in (2, 5, 9):
            recon = np.load(out / f"recon_{s}_seed0_after{t}.npy")
            assert recon.shape == (10, 1, 28, 28)
        assert not np.allclose(np.load(out / f"recon_{s}_seed0_after2.npy"),
                               np.load(out / f"recon_{s}_seed0_after9.npy"))
    assert np.load(out / "samples_replay_seed0.npy").shape[0] == 9
    assert (out / "reconstructions.png").is_file() and (out / "replay_samples.png").is_file()
    assert "mlp VAE, score l1" in (out / "results.md").read_text()


def test_validate_writes_the_validation_table_and_no_test_files(tmp_path):
    out = tmp_path / "val"
    code, text = cli("experiment", "continual_mnist", "--validate", "--epochs", 1, "--batch-size", 64,
                     "--latent-dim", 2, "--strategies", "finetune", "--seeds", 100, "--out", out)
    assert code == 0, text
    row = json.loads((out / "results.jsonl").read_text())
    assert row["settings"]["protocol"] == "validation" and row["split"] == "validation"
    assert row["n_anomalies"] == 50 and row["n_test_normal_per_task"] == [50] * 9
    table = (out / "validation.md").read_text()
    assert f"| finetune | 100 | conv28 | mse | 2 | 0.001 | 1 |  | {row['auroc'][-1]:.3f} |" in table
    assert not list(out.glob("*.npy")) and not (out / "results.md").exists()


def test_a_missing_mnist_root_is_one_line(tmp_path):
    code, text = cli("experiment", "continual_mnist", "--mnist-root", tmp_path / "nope", "--out", tmp_path)
    assert code != 0 and "does not exist" in text and "Traceback" not in text


def test_the_selection_rule_picks_the_best_mean_over_tasks():
    def row(strategy, lr, z, auroc, lam=None):
        st = {"lr": lr, "latent_dim": z, "protocol": "validation", **({"ewc_lambda": lam} if lam else {})}
        return {"strategy": strategy, "seed": 100, "settings": st, "auroc": auroc}

    rows = [row(s, 1e-3, 8, [0.9, 0.8]) for s in ("joint", "replay", "finetune")]
    rows += [row("joint", 3e-3, 8, [1.0, 1.0]), row("replay", 3e-3, 8, [0.9, 0.9]),
             row("finetune", 3e-3, 8, [0.4, 0.4])]  # mean 0.767 < 0.85
    rows += [row("joint", 1e-3, 32, [1.0, 1.0])]  # incomplete: not a candidate
    rows += [row("ewc", 1e-3, 8, [0.7, 0.9], 1.0), row("ewc", 1e-3, 8, [0.9, 0.95], 100.0),
             row("ewc", 3e-3, 8, [1.0, 1.0], 1e4)]  # other lr: ignored
    test_row = row("joint", 1e-2, 8, [1.0, 1.0])
    test_row["settings"]["protocol"] = "test-v2"  # a test-set row never takes part
    chosen = continual_mnist.choose_settings([*rows, test_row, row("replay", 1e-2, 8, [1, 1]),
                                              row("finetune", 1e-2, 8, [1, 1])])
    assert (chosen["lr"], chosen["latent_dim"], chosen["ewc_lambda"]) == (1e-3, 8, 100.0)
    assert chosen["score"] == pytest.approx(0.85) and chosen["candidates"] == 2
