"""Data specs: one string names a train/test pair, for the CLI and experiments.

    mnist:anomaly=0[,seed=0,train_frac=0.8,root=DIR]   one-class MNIST (GANomaly protocol)
    textures:brick[,root=DIR,size=128]                 texture set built from scikit-image photos
    PATH                                               an MVTec-layout category folder
                                                       (train/good + test/...), or a plain folder
                                                       of good images (train only)
    PATH[,size=256,channels=3,on_error=raise]          options for folders
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anomalab.types import ImageSet

DEFAULT_TEXTURES_ROOT = Path("runs/datasets/textures")


def _options(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise ValueError(f"data spec option {part!r} is not key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _int(opts: dict[str, str], key: str, default: int | None) -> int | None:
    return int(opts[key]) if key in opts else default


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """'mnist:anomaly=0' -> ('mnist', '', {'anomaly': '0'}); 'textures:brick,size=64' -> ('textures',
    'brick', {'size': '64'}); 'path,size=64' -> ('folder', 'path', {'size': '64'})."""
    head, _, rest = spec.partition(":")
    if head in ("mnist", "textures") and _:
        first, _, opts = rest.partition(",")
        if head == "mnist" and "=" in first:
            return head, "", _options(rest)
        return head, first, _options(opts)
    path, _, opts = spec.partition(",")
    return "folder", path, _options(opts)


def load_spec(spec: str) -> tuple[ImageSet, ImageSet | None, dict[str, Any]]:
    """(train normals, test set with labels or None, description) for a data spec."""
    kind, target, opts = parse_spec(spec)
    if kind == "mnist":
        from anomalab.data.mnist import load_mnist
        from anomalab.data.splits import one_class_split

        if "anomaly" not in opts:
            raise ValueError("mnist spec needs the anomalous digit: mnist:anomaly=0")
        unknown = set(opts) - {"anomaly", "seed", "train_frac", "root"}
        if unknown:
            raise ValueError(f"unknown mnist option(s) {sorted(unknown)}")
        ds = load_mnist(opts.get("root"))
        train, test = one_class_split(ds, int(opts["anomaly"]), float(opts.get("train_frac", 0.8)),
                                      seed=int(opts.get("seed", 0)))
        name = f"mnist{len(ds)}-anomaly{opts['anomaly']}"
        return train, test, {"spec": spec, "name": name}
    if kind == "textures":
        from anomalab.data.folder import load_mvtec
        from anomalab.data.textures import make_textures

        root = Path(opts.get("root", DEFAULT_TEXTURES_ROOT))
        if not (root / target / "train").is_dir():
            make_textures(root, categories=(target,))
        size = _int(opts, "size", None)
        train = load_mvtec(root, target, "train", size=size)
        test = load_mvtec(root, target, "test", size=size)
        return train, test, {"spec": spec, "name": f"textures-{target}"}
    from anomalab.data.folder import load_folder, load_mvtec

    path = Path(target)
    if not path.exists():
        raise FileNotFoundError(f"data folder not found: {path}")
    size, channels = _int(opts, "size", None), _int(opts, "channels", None)
    on_error = opts.get("on_error", "skip")
    if (path / "train" / "good").is_dir():
        train = load_mvtec(path, None, "train", size=size, channels=channels, on_error=on_error)
        test = None
        if (path / "test").is_dir():
            test = load_mvtec(path, None, "test", size=size or train.shape[1:], channels=train.shape[0],
                              on_error=on_error)
        return train, test, {"spec": spec, "name": path.name}
    train = load_folder(path, size=size, channels=channels, on_error=on_error)
    return train, None, {"spec": spec, "name": path.name}
