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

from anomalab.errors import DataError, DataNotFoundError, ParameterError
from anomalab.types import ImageSet

DEFAULT_TEXTURES_ROOT = Path("runs/datasets/textures")


def _options(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise ParameterError(f"data spec option {part!r} is not key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _int(opts: dict[str, str], key: str, default: int | None) -> int | None:
    return int(opts[key]) if key in opts else default


# kind -> option -> (check, what it must be); checked by `check_spec` before anything is read
def _positive_int(v: str) -> bool:
    return v.isdigit() and int(v) > 0


def _fraction(v: str) -> bool:
    try:
        return 0.0 < float(v) < 1.0
    except ValueError:
        return False


OPTIONS: dict[str, dict[str, tuple]] = {
    "mnist": {"anomaly": (lambda v: v.isdigit() and 0 <= int(v) <= 9, "a digit 0-9"),
              "seed": (str.isdigit, "an integer >= 0"), "train_frac": (_fraction, "a number in (0, 1)"),
              "root": (lambda v: Path(v).is_dir(), "an existing folder with the MNIST IDX files")},
    "textures": {"size": (_positive_int, "a positive integer (pixels)"), "root": (lambda v: bool(v), "a folder")},
    "folder": {"size": (_positive_int, "a positive integer (pixels)"),
               "channels": (lambda v: v in ("1", "3"), "1 or 3"),
               "on_error": (lambda v: v in ("skip", "raise"), "skip or raise")},
}


def check_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """Parse `spec` and check its options (names and values) and paths, without reading any image;
    a mistake is one ParameterError / DataNotFoundError naming the option."""
    if not isinstance(spec, str) or not spec.strip():
        raise ParameterError("the data spec is empty: give mnist:anomaly=0, textures:brick or a folder")
    kind, target, opts = parse_spec(spec)
    known = OPTIONS[kind]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ParameterError(f"data spec {spec!r}: unknown option{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; {kind} specs take: {', '.join(known)}")
    for key, value in opts.items():
        ok, what = known[key]
        if not ok(value):
            raise ParameterError(f"data spec {spec!r}: {key} must be {what}, got {value!r}")
    if kind == "mnist" and "anomaly" not in opts:
        raise ParameterError("mnist spec needs the anomalous digit: mnist:anomaly=0")
    if kind == "textures":
        from anomalab.data.textures import CATEGORIES

        if target not in CATEGORIES and not (Path(opts.get("root", DEFAULT_TEXTURES_ROOT)) / target).is_dir():
            raise ParameterError(f"unknown texture {target!r}; known: {', '.join(CATEGORIES)}")
    if kind == "folder":
        path = Path(target)
        if not path.exists():
            raise DataNotFoundError(f"data folder not found: {target}")
        if path.is_dir() and not (path / "train" / "good").is_dir():
            from anomalab.data.folder import mvtec_categories

            categories = mvtec_categories(path)
            if categories:
                shown = ", ".join(categories[:12]) + (", ..." if len(categories) > 12 else "")
                raise DataError(f"{target} is a dataset root holding {len(categories)} MVTec-layout categor"
                                f"{'ies' if len(categories) > 1 else 'y'} ({shown}); pass one category "
                                f"folder, e.g. {path / categories[0]}")
    return kind, target, opts


def inputs_of(spec: str) -> list[Path]:
    """The folders a data spec reads from (outputs must never be written into them)."""
    kind, target, opts = parse_spec(spec)
    if kind == "folder":
        return [Path(target)]
    if kind == "textures":
        return [Path(opts.get("root", DEFAULT_TEXTURES_ROOT)) / target]
    return [Path(opts["root"])] if "root" in opts else []


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
    kind, target, opts = check_spec(spec)
    if kind == "mnist":
        from anomalab.data.mnist import load_mnist
        from anomalab.data.splits import one_class_split

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
