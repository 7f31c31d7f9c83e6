"""One parser and validator of parameters, typed from the signature of what they configure.

`parse_items(["k=3", "device=cpu"])` turns command-line `key=value` items into raw strings;
`validate(cls, params)` checks names against `cls.__init__`, converts each value to the type of its
annotation (or of its default), and checks the value against the rule for its name (below), raising one
`ParameterError` that names the owner and the parameter: `knn: k must be an integer, got 'three'`.
`anomalab.create`, the CLI, continual strategies and the experiments all go through it, so a bad value
is refused before any folder is written or any training starts.

The rules are keyed by parameter *name*: parameters every detector shares are spelled the same everywhere
(`epochs`, `batch_size`, `lr`, `latent_dim`, `seed`, `device`), so one table covers them all.
"""

from __future__ import annotations

import inspect
import json
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from anomalab.errors import ParameterError, UnknownNameError

# name -> (check, what the value must be); the check gets the converted value
_POSITIVE_INT = {"epochs", "batch_size", "latent_dim", "k", "n_components", "width", "n_steps", "embedding_dim",
                 "image_size", "added_dims", "fisher_samples", "n", "size", "tile", "coreset_dims",
                 "d_channels", "projection_dim", "train_limit", "test_limit", "folds"}
_NON_NEGATIVE_INT = {"seed", "steps", "train_blocks", "overlap", "kl_warmup_steps", "warmup_steps"}
_POSITIVE_FLOAT = {"lr", "lr_d", "latent_lr", "sigma", "scale", "temperature"}
_NON_NEGATIVE_FLOAT = {"beta", "gamma", "ewc_lambda", "margin", "eps", "shrinkage", "kl_weight", "weight"}
_WEIGHT_PREFIX = "w_"  # loss weights (w_adv, w_con, w_kd, ...): >= 0
_UNIT_INTERVAL = {"replay_fraction", "ema", "coreset_ratio", "degree", "fisher_decay", "beta1", "momentum", "lam"}
_DEVICE_HINT = "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"


def _is_device(value: str) -> bool:
    if value in ("cpu", "cuda", "mps", "auto"):
        return True
    head, _, index = value.partition(":")
    return head == "cuda" and index.isdigit()


def rule_error(name: str, value: Any) -> str | None:
    """Why `value` is not allowed for a parameter called `name` (None when it is fine)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if name in _POSITIVE_INT and isinstance(value, int) and value < 1:
        return f"must be a positive integer, got {value!r}"
    if name in _NON_NEGATIVE_INT and isinstance(value, int) and value < 0:
        return f"must be >= 0, got {value!r}"
    if isinstance(value, (int, float)):
        if name in _POSITIVE_FLOAT and value <= 0:
            return f"must be > 0, got {value!r}"
        if (name in _NON_NEGATIVE_FLOAT or name.startswith(_WEIGHT_PREFIX)) and value < 0:
            return f"must be >= 0, got {value!r}"
        if name in _UNIT_INTERVAL and not 0 <= value <= 1:
            return f"must be in [0, 1], got {value!r}"
    if name == "device" and isinstance(value, str) and not _is_device(value):
        return f"must be {_DEVICE_HINT}, got {value!r}"
    return None


def parse_items(items: Iterable[str], what: str = "parameter") -> dict[str, str]:
    """('epochs=5', 'device=cpu') -> {'epochs': '5', 'device': 'cpu'} (values stay strings: `validate`
    converts them by type). A repeated key or an item without '=' is an error."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ParameterError(f"{what} {item!r} is not key=value (e.g. epochs=5)")
        if key in out:
            raise ParameterError(f"{what} {key!r} is given twice")
        out[key] = value.strip()
    return out


def _annotations(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that cannot be evaluated here: fall back to the defaults' types
        return {}


def _kinds(annotation: Any, default: Any) -> tuple[type, ...]:
    """The plain types a value may take: from the annotation (X | None, Union, Literal), else the default."""
    if annotation is inspect.Parameter.empty or annotation is None or annotation is Any:
        if default is None or default is inspect.Parameter.empty:
            return ()
        return (type(default),)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return tuple({type(a) for a in typing.get_args(annotation)})
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        kinds: list[type] = []
        for arg in typing.get_args(annotation):
            kinds.extend(_kinds(arg, inspect.Parameter.empty) if arg is not type(None) else [type(None)])
        return tuple(kinds)
    if origin is not None:
        return (origin,)
    return (annotation,) if isinstance(annotation, type) else ()


_TYPE_WORD = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
              tuple: "a list", list: "a list", dict: "a JSON object", type(None): "null"}


def _convert(value: Any, kinds: tuple[type, ...]) -> tuple[bool, Any]:
    """(ok, converted value) for a raw value (a string from the command line, or a Python value)."""
    if not kinds:
        if isinstance(value, str):
            try:
                return True, json.loads(value)
            except json.JSONDecodeError:
                return True, value
        return True, value
    if isinstance(value, str):
        text = value.strip()
        for kind in kinds:  # the first kind the text reads as, in the annotation's order
            if kind is type(None) and text.lower() in ("none", "null"):
                return True, None
            if kind is bool and text.lower() in ("true", "false", "1", "0", "yes", "no"):
                return True, text.lower() in ("true", "1", "yes")
            if kind is int:
                try:
                    return True, int(text)
                except ValueError:
                    continue
            if kind is float:
                try:
                    return True, float(text)
                except ValueError:
                    continue
            if kind in (list, tuple, dict):
                try:
                    parsed = json.loads(text)
                except json.JSONDecodeError:
                    continue
                if isinstance(parsed, (list, dict)):
                    return True, kind(parsed) if kind is not dict else parsed
            if kind is str:
                return True, value
        return False, value
    for kind in kinds:
        if kind is type(None) and value is None:
            return True, None
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value) if isinstance(value, int) else value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if kind is int and isinstance(value, float) and value.is_integer():
            return True, int(value)
        if kind is bool and isinstance(value, bool):
            return True, value
        if kind in (list, tuple) and isinstance(value, (list, tuple)):
            return True, kind(value)
        if kind not in (int, float, bool, type(None), list, tuple) and isinstance(value, kind):
            return True, value
    return False, value


def signature_defaults(cls: type) -> dict[str, Any]:
    """name -> default of `cls.__init__`'s parameters (inspect.Parameter.empty where none)."""
    sig = inspect.signature(cls.__init__)
    return {p: v.default for p, v in sig.parameters.items()
            if p != "self" and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)}


def validate(cls: type, params: Mapping[str, Any], owner: str | None = None,
             extra_rules: Mapping[str, Callable[[Any], str | None]] | None = None) -> dict[str, Any]:
    """Check and convert `params` for `cls(**params)`; raise ParameterError naming `owner` and the parameter.

    Unknown names, values of the wrong type and values the rule table refuses are errors; values that
    arrive as strings (the command line) are converted to the annotated type."""
    owner = owner or getattr(cls, "name", "") or cls.__name__
    defaults = signature_defaults(cls)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ParameterError(f"{owner} has no parameter{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(map(repr, unknown))}; it takes: {', '.join(defaults)}")
    hints = _annotations(cls)
    out: dict[str, Any] = {}
    for name, raw in params.items():
        kinds = _kinds(hints.get(name, inspect.Parameter.empty), defaults[name])
        ok, value = _convert(raw, kinds)
        if not ok:
            words = " or ".join(dict.fromkeys(_TYPE_WORD.get(k, k.__name__) for k in kinds))
            raise ParameterError(f"{owner}: {name} must be {words}, got {raw!r}")
        problem = rule_error(name, value)
        if problem is None and extra_rules and name in extra_rules:
            problem = extra_rules[name](value)
        if problem:
            raise ParameterError(f"{owner}: {name} {problem}")
        out[name] = value
    return out


def choose(name: str, known: Iterable[str], what: str) -> str:
    """`name` if it is one of `known`, else an UnknownNameError listing them."""
    known = list(known)
    if name not in known:
        raise UnknownNameError(f"unknown {what} '{name}'; known: {', '.join(known)}")
    return name
