"""One explicit table of detectors: name -> "module:Class", imported lazily on first use.

Importing this module loads neither torch nor any detector: `list_detectors` and `describe` (a detector's
first doc sentence and parameters, read from its source) work without them, so `anomalab list` is quick."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anomalab.errors import LoadError
from anomalab.params import choose, validate

if TYPE_CHECKING:
    from anomalab.detector import BaseDetector

REGISTRY: dict[str, str] = {
    "conv_ae": "anomalab.detectors.conv_ae:ConvAE",
    "vae": "anomalab.detectors.vae:VAE",
    "knn": "anomalab.detectors.knn:KNN",
    "pca": "anomalab.detectors.pca:PCA",
    "anogan": "anomalab.detectors.anogan:AnoGAN",
    "egbad": "anomalab.detectors.egbad:EGBAD",
    "ganomaly": "anomalab.detectors.ganomaly:GANomaly",
    "skip_ganomaly": "anomalab.detectors.skip_ganomaly:SkipGANomaly",
    "gaussian": "anomalab.detectors.gaussian:Gaussian",
    "metric": "anomalab.detectors.metric:Metric",
    "patchcore": "anomalab.detectors.patchcore:PatchCore",
    "padim": "anomalab.detectors.padim:PaDiM",
}


def list_detectors() -> list[str]:
    """Names accepted by `create`, in table order."""
    return list(REGISTRY)


def detector_class(name: str) -> type[BaseDetector]:
    module, cls = REGISTRY[choose(name, REGISTRY, "detector")].split(":")
    return getattr(importlib.import_module(module), cls)


def create(name: str, **params: Any) -> BaseDetector:
    """A new, unfitted detector: `create("vae", latent_dim=16, epochs=10)`. Parameters are checked and
    converted by `anomalab.params.validate` (strings from a command line are converted to their types);
    a wrong name, type or value is a `ParameterError` naming the parameter."""
    cls = detector_class(name)
    return cls(**validate(cls, params, owner=name))


def load(path: str | Path) -> BaseDetector:
    """Load a saved detector from its folder, or from a run folder holding `detector/`."""
    path = Path(path)
    if (path / "detector").is_dir():
        path = path / "detector"
    from anomalab.detector import read_meta

    meta = read_meta(path)
    if meta["name"] not in REGISTRY:
        raise LoadError(f"{path} holds an unknown detector '{meta['name']}'")
    if (path / "tiling.json").is_file():  # a detector fitted on tiles (anomalab.tiling)
        from anomalab.tiling import TiledDetector

        return TiledDetector.load(path)
    return detector_class(meta["name"]).load(path)


# ---- describing a detector without importing it ------------------------------------------------------------
class _Unresolved(Exception):
    """The source alone does not answer (a computed default, a class built at run time): import instead."""


_TREES: dict[str, tuple[ast.Module, bool]] = {}  # module -> (parsed source, is a package); this process only


def _tree(module: str) -> tuple[ast.Module, bool]:
    """The parsed source of an anomalab module, found beside this file (nothing is imported)."""
    if module not in _TREES:
        head, *parts = module.split(".")
        if head != "anomalab":
            raise _Unresolved(module)
        base = Path(__file__).resolve().parent.joinpath(*parts)
        for path, package in ((base.with_suffix(".py"), False), (base / "__init__.py", True)):
            if path.is_file():
                _TREES[module] = (ast.parse(path.read_text(encoding="utf-8"), str(path)), package)
                break
        else:
            raise _Unresolved(module)
    return _TREES[module]


def _imported_from(module: str, name: str) -> tuple[str, str] | None:
    """(module, name there) that a top-level `from ... import` of `module` binds `name` to, else None."""
    tree, package = _tree(module)
    for node in tree.body:
        if not isinstance(node, ast.ImportFrom):
            continue
        for alias in node.names:
            if (alias.asname or alias.name) == name:
                if node.level:
                    parent = module if package else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    source = f"{parent}.{node.module}" if node.module else parent
                else:
                    source = node.module or ""
                return source, alias.name
    return None


def _find_class(module: str, name: str, depth: int = 0) -> tuple[str, ast.ClassDef]:
    """(defining module, class node) of `name` as seen from `module`, following re-exports."""
    if depth > 8:
        raise _Unresolved(name)
    for node in _tree(module)[0].body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return module, node
    source = _imported_from(module, name)
    if source is None:
        raise _Unresolved(name)
    return _find_class(*source, depth + 1)


def _constant(module: str, node: ast.expr, depth: int = 0) -> Any:
    """The value of a default written as a literal or as a module-level constant (possibly imported)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if not isinstance(node, ast.Name) or depth > 8:
        raise _Unresolved(ast.dump(node))
    for stmt in _tree(module)[0].body:
        if isinstance(stmt, ast.Assign):
            targets = stmt.targets
        elif isinstance(stmt, ast.AnnAssign):
            targets = [stmt.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == node.id for t in targets) and stmt.value is not None:
            return _constant(module, stmt.value, depth + 1)
    source = _imported_from(module, node.id)
    if source is None:
        raise _Unresolved(node.id)
    return _constant(source[0], ast.Name(id=source[1], ctx=ast.Load()), depth + 1)


def _init_of(module: str, cls: ast.ClassDef, depth: int = 0) -> tuple[str, ast.FunctionDef]:
    """(module, `__init__` node) of a class or of the first base that defines one (bases in MRO order
    only for single inheritance chains; anything else is left to the import)."""
    if cls.decorator_list or depth > 8:
        raise _Unresolved(cls.name)
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            return module, node
    names = [b.id for b in cls.bases if isinstance(b, ast.Name)]
    if len(names) != len(cls.bases):
        raise _Unresolved(cls.name)
    found = []
    for base in names:
        try:
            found.append(_init_of(*_find_class(module, base), depth + 1))
        except _Unresolved:
            found.append(None)
    if len(found) == 1 and found[0] is not None:
        return found[0]
    raise _Unresolved(cls.name)


def _describe_source(name: str) -> tuple[str, dict[str, Any]]:
    import inspect

    module, cls_name = REGISTRY[name].split(":")
    defining, cls = _find_class(module, cls_name)
    where, init = _init_of(defining, cls)
    args = init.args
    if args.vararg or args.kwarg:
        raise _Unresolved(cls_name)
    positional = [*args.posonlyargs, *args.args]
    defaults: list[Any] = [inspect.Parameter.empty] * (len(positional) - len(args.defaults))
    defaults += [_constant(where, d) for d in args.defaults]
    params = {a.arg: d for a, d in zip(positional, defaults)}
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        params[a.arg] = inspect.Parameter.empty if d is None else _constant(where, d)
    params.pop("self", None)
    return ast.get_docstring(_tree(defining)[0], clean=False) or "", params


def describe(name: str) -> tuple[str, dict[str, Any]]:
    """(first paragraph of the docstring of the detector's module, `__init__` parameter -> default) of a
    registered detector, read from its source without importing it (and so without torch); a default the
    source does not spell out as a constant falls back to importing the class."""
    name = choose(name, REGISTRY, "detector")
    try:
        doc, params = _describe_source(name)
    except (_Unresolved, OSError, SyntaxError):
        import inspect
        import sys

        cls = detector_class(name)
        sig = inspect.signature(cls.__init__)
        params = {p: v.default for p, v in sig.parameters.items() if p != "self"}
        doc = sys.modules[cls.__module__].__doc__ or ""
    return doc.strip().split("\n\n")[0].replace("\n", " "), params
