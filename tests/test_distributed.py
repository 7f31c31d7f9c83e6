"""Fit and score over 2 gloo processes on loopback (torchrun), against the same computations in one process.

Run as a script under torchrun (`python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed.py
OUT`), this file is the worker: every rank fits in `anomalab.distributed.scope()`, rank 0 also fits in one
process (the reference, same thread count and features) and a naive per-rank fit (the negative control), and
each rank saves what it got to OUT/rank<r>.pt. The tests read those files.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_port()), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ---- the worker ---------------------------------------------------------------------------------------
def _images(n: int, c: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, c, 1, 1, generator=g)
    return (0.6 * base + 0.4 * torch.rand(n, c, size, size, generator=g)).clamp(0, 1)


def _worker(out: Path) -> None:
    from anomalab import distributed
    from anomalab.detector import nets_state
    from anomalab.detectors.gaussian import Gaussian
    from anomalab.detectors.patchcore import PatchCore
    from anomalab.detectors.vae import VAE
    from anomalab.errors import DataError

    g = distributed.init()
    assert g is not None and g.world == 2
    result: dict = {}
    photos, test = _images(10, 3, 48, 0), _images(6, 3, 48, 1)

    # gaussian: statistics and scores
    def gaussian():
        return Gaussian(image_size=64, batch_size=2)

    with distributed.scope():
        det = gaussian()
        det.progress = False
        shape = det._model_shape()
        det._build(shape)
        batches = [photos[i : i + 2] for i in range(0, 10, 2)]
        pooled, moments = det._stream(batches, shape)
        det.fit(photos)
    result["gaussian"] = {"s1": moments.s1, "s2": moments.s2, "sax": moments.sax, "n": moments.n,
                          "pooled": torch.cat(pooled[9]), "means": det.means_, "precisions": det.precisions_,
                          "patch_mean": det.patch_mean_, "patch_precision": det.patch_precision_,
                          "scores": det.score(test), "maps": det.score_map(test)}
    if g.rank == 0:
        ref = gaussian()
        ref.progress = False
        ref._build(shape)
        pooled, moments = ref._stream(batches, shape)
        ref.fit(photos)
        naive = gaussian().fit(photos[:6])  # what rank 0 alone would fit on its share: no all-reduce
        naive_m = naive._stream(batches[0::2], shape)[1]
        result["gaussian_ref"] = {"s1": moments.s1, "s2": moments.s2, "sax": moments.sax, "n": moments.n,
                                  "pooled": torch.cat(pooled[9]), "scores": ref.score(test),
                                  "maps": ref.score_map(test), "naive_s2": naive_m.s2,
                                  "naive_scores": naive.score(test)}

    # vae: 3 steps (23 images, batch 8: 8, 8 and an uneven 7 = 4 + 3) under the training contract
    digits = _images(23, 1, 28, 2)

    def vae(batch_size=8):
        det = VAE(latent_dim=4, epochs=1, batch_size=batch_size, seed=3)
        det.progress = False
        return det

    with distributed.scope():
        det = vae().fit(digits)
    result["vae"] = {"state": {k: v.clone() for k, v in nets_state(det._nets()).items()}, "history": det.history_}
    if g.rank == 0:
        ref = vae().fit(digits)
        naive = vae(batch_size=4).fit(digits)  # each rank's share as its own batch: what N plain copies train
        result["vae_ref"] = {"state": nets_state(ref._nets()), "history": ref.history_,
                             "naive": nets_state(naive._nets())}

    # the GANs: 3 steps each (20 images, batch 8: 8, 8, 4), GANomaly's D re-initialisation decided on the
    # whole batch's loss, AnoGAN's z drawn for the whole batch; BatchNorm statistics re-estimated after training
    from anomalab.detectors.anogan import AnoGAN
    from anomalab.detectors.ganomaly import GANomaly

    small = _images(20, 1, 16, 4)
    gans = {"ganomaly": lambda: GANomaly(latent_dim=4, width=4, epochs=1, batch_size=8, seed=5),
            "anogan": lambda: AnoGAN(latent_dim=4, width=4, n_steps=3, epochs=1, batch_size=8, seed=5)}
    for name, make in gans.items():
        with distributed.scope():
            det = make()
            det.progress = False
            det.fit(small)
        result[name] = {k: v.clone() for k, v in nets_state(det._nets()).items()}
        if g.rank == 0:
            ref = make()
            ref.progress = False
            ref.fit(small)
            result[name + "_ref"] = nets_state(ref._nets())

    # patchcore: the whole bank
    def patchcore():
        return PatchCore(image_size=64, batch_size=2, coreset_ratio=0.1)

    with distributed.scope():
        det = patchcore().fit(photos)
    result["patchcore"] = {"bank": det.bank_, "n_candidates": det.n_candidates_, "scores": det.score(test)}
    if g.rank == 0:
        ref = patchcore().fit(photos)
        half = patchcore().fit(photos[:6])
        result["patchcore_ref"] = {"bank": ref.bank_, "n_candidates": ref.n_candidates_, "scores": ref.score(test),
                                   "half_bank": half.bank_}

    # a failure on rank 1 only stops both ranks, with rank 1's message
    def fails_on_1():
        if g.rank == 1:
            raise DataError("cannot read bad.png")
        return "ok"

    try:
        distributed.agree(fails_on_1)
    except Exception as e:  # noqa: BLE001
        result["error"] = f"{type(e).__name__}: {e}"
    torch.save(result, out / f"rank{g.rank}.pt")
    distributed.shutdown()


# ---- the tests ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("dist")
    done = torchrun(str(Path(__file__)), str(out), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def test_gaussian_statistics_and_scores_equal_one_process(worker):
    r0, r1 = worker
    d, ref = r0["gaussian"], r0["gaussian_ref"]
    assert d["n"] == ref["n"] == 10
    for key in ("s1", "s2", "sax"):
        assert _rel(d[key], ref[key]) < 1e-9, key  # all-reduced float64 sums: rounding only
    assert torch.equal(d["pooled"], ref["pooled"])  # gathered back in the original order
    assert torch.allclose(d["scores"], ref["scores"], rtol=1e-9, atol=0)
    assert torch.allclose(d["maps"], ref["maps"], rtol=1e-5, atol=1e-5)  # float32 patch precisions
    # every rank holds the same fitted detector
    assert torch.allclose(r1["gaussian"]["scores"], d["scores"], rtol=1e-9, atol=0)
    # negative control: rank 0's share alone (no all-reduce) gives other statistics and scores
    assert _rel(ref["naive_s2"], ref["s2"]) > 0.1
    assert not torch.allclose(ref["naive_scores"], ref["scores"], rtol=1e-3)


def test_vae_trained_under_ddp_equals_one_process(worker):
    r0, r1 = worker
    d, ref = r0["vae"]["state"], r0["vae_ref"]["state"]
    assert d.keys() == ref.keys()
    worst = max(float((d[k].double() - ref[k].double()).abs().max()) for k in d)
    assert worst < 1e-5, worst
    assert all(torch.equal(r1["vae"]["state"][k], d[k]) for k in d)  # both ranks hold the same weights
    for a, b in zip(r0["vae"]["history"], r0["vae_ref"]["history"]):  # logged losses: the whole batch's means
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])) for k in a)
    # negative control: each rank's share trained as its own batch (N plain copies) is another training
    naive = r0["vae_ref"]["naive"]
    assert max(float((naive[k].double() - ref[k].double()).abs().max()) for k in d) > 1e-3


@pytest.mark.parametrize("name", ["ganomaly", "anogan"])
def test_gans_trained_under_ddp_equal_one_process(worker, name):
    r0, r1 = worker
    d, ref = r0[name], r0[name + "_ref"]
    assert d.keys() == ref.keys()
    worst = max(float((d[k].double() - ref[k].double()).abs().max()) for k in d)
    assert worst < 1e-5, worst  # weights and the re-estimated BatchNorm statistics
    assert all(torch.equal(r1[name][k], d[k]) for k in d)


def test_patchcore_bank_is_the_whole_one(worker):
    r0, r1 = worker
    d, ref = r0["patchcore"], r0["patchcore_ref"]
    assert d["n_candidates"] == ref["n_candidates"]
    assert d["bank"].shape == ref["bank"].shape  # the whole bank, never half of it
    assert len(ref["half_bank"]) < len(ref["bank"])
    assert torch.allclose(d["bank"], ref["bank"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(d["scores"], ref["scores"], rtol=1e-5, atol=1e-6)  # the stated tolerance
    assert torch.equal(r1["patchcore"]["bank"], d["bank"])


def test_a_failing_rank_stops_every_rank_with_its_message(worker):
    r0, r1 = worker
    assert r1["error"] == "DataError: cannot read bad.png"
    assert r0["error"] == "DistributedError: rank 1: cannot read bad.png"


def test_torchrun_fit_and_merged_score_equal_one_process(tmp_path, mvtec_tree):
    from conftest import cli
    from safetensors.torch import load_file

    run = tmp_path / "run"
    done = torchrun("-m", "anomalab", "fit", "gaussian", "image_size=64", "--data", str(mvtec_tree), "--out",
                    str(run), "--no-figures", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("fitted gaussian") == 1  # rank 0 alone reports and writes
    assert not [p for p in tmp_path.iterdir() if p.name != "run"]  # nothing else written beside it
    single, merged = tmp_path / "single", tmp_path / "merged.csv"
    test = [str(mvtec_tree / "test" / "scratch"), str(mvtec_tree / "test" / "good")]
    done = torchrun("-m", "anomalab", "score", str(run), *test, "--out", str(merged), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each rank's thread count: kernels may round differently with more threads
    try:
        assert cli("fit", "gaussian", "image_size=64", "--data", str(mvtec_tree), "--out", str(single),
                   "--no-figures")[0] == 0
        code, whole = cli("score", str(run), *test)
    finally:
        torch.set_num_threads(threads)
    a, b = load_file(run / "detector" / "weights.safetensors"), load_file(single / "detector" / "weights.safetensors")
    assert a.keys() == b.keys()
    assert all(_rel(a[k], b[k]) < 1e-6 for k in a)  # float32 statistics from all-reduced float64 sums
    assert code == 0
    assert merged.read_text() == whole  # the merged rows equal the unsharded ones: same order, same digits


def test_torchrun_refuses_what_it_cannot_distribute(tmp_path, mvtec_tree):
    done = torchrun("-m", "anomalab", "fit", "knn", "--data", str(mvtec_tree), "--out", str(tmp_path / "r"),
                    cwd=tmp_path)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: knn cannot be fitted under torchrun (its result would differ from one process's); "
                     "distributed fitting supports conv_ae, vae, ganomaly, skip_ganomaly, anogan, gaussian, padim, "
                     "patchcore: run knn in one process"]
    assert not (tmp_path / "r").exists()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]))
