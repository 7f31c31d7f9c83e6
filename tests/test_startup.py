"""A quick command line: `import anomalab`, `--help`, `list` and every `COMMAND --help` load neither torch nor
scikit-learn nor matplotlib (checked in fresh processes with `-X importtime`; a behaviour test, not a timing one)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from anomalab.cli import main

HEAVY = ("torch", "sklearn", "matplotlib")


def _imported(*args: str) -> set[str]:
    """Top-level packages a fresh `python -X importtime ARGS` imports (from importtime's stderr lines)."""
    result = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert result.returncode == 0, result.stderr[-2000:]
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "anomalab" in names  # the parse worked
    return names


def _commands(group: click.Group = main, path: tuple[str, ...] = ()):
    yield path, group
    for name, cmd in getattr(group, "commands", {}).items():
        yield from _commands(cmd, (*path, name))


def test_import_anomalab_loads_none_of_them():
    assert not _imported("-c", "import anomalab") & set(HEAVY)


def test_core_modules_load_no_sklearn_or_matplotlib():
    core = "anomalab.registry, anomalab.evaluation, anomalab.metrics, anomalab.types, anomalab.data.specs, " \
        "anomalab.scoring, anomalab.runs, anomalab.progress"
    names = _imported("-c", f"import {core}; import anomalab; anomalab.create('knn'); anomalab.evaluate")
    assert "torch" in names and not names & {"sklearn", "matplotlib"}


@pytest.mark.parametrize("args", [["--help"], ["list"], *[[*p, "--help"] for p, _ in _commands() if p]],
                         ids=lambda a: " ".join(a))
def test_help_and_list_load_none_of_them(args):
    assert not _imported("-m", "anomalab.cli", *args) & set(HEAVY), args


def test_list_reads_the_same_parameters_and_docs_as_the_classes():
    from anomalab.registry import describe, detector_class, list_detectors

    for name in list_detectors():
        cls = detector_class(name)
        doc, params = describe(name)
        sig = inspect.signature(cls.__init__)
        assert params == {p: v.default for p, v in sig.parameters.items() if p != "self"}, name
        assert [repr(v) for v in params.values()] == [repr(v.default) for p, v in sig.parameters.items()
                                                      if p != "self"], name
        module_doc = sys.modules[cls.__module__].__doc__ or ""
        assert doc == module_doc.strip().split("\n\n")[0].replace("\n", " "), name


def test_every_help_names_only_options_its_command_takes():
    for path, cmd in _commands():
        ctx = click.Context(cmd, info_name="anomalab " + " ".join(path), terminal_width=10_000,
                            max_content_width=10_000)  # no wrapping inside an option name
        text = cmd.get_help(ctx)
        text = re.sub(r"\s+", " ", text.split("\nCommands:")[0])  # a group's list quotes its commands
        own = {o for p in cmd.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}
        own.add("--help")
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", text))
        assert named <= own, (path, sorted(named - own))


def test_fit_without_a_detector_recommends_one_and_exits_2():
    result = CliRunner().invoke(main, ["fit"])
    assert result.exit_code == 2
    assert "gaussian" in result.output and "vae" in result.output and "photos" in result.output
    assert "error: name a DETECTOR" in result.output
    result = CliRunner().invoke(main, ["fit", "--data", "somewhere", "--out", "nowhere"])
    assert result.exit_code == 2 and "Which detector?" in result.output
    result = CliRunner().invoke(main, ["fit", "knn"])
    assert result.exit_code == 2 and "Missing option '--data'" in result.output


def test_make_defects_kinds_are_the_generators_test_defects():
    from anomalab.cli import DEFECT_KINDS
    from anomalab.data.make_defects import KINDS

    assert DEFECT_KINDS == KINDS
