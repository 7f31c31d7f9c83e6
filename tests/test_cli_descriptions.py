"""Every description `anomalab list` and `anomalab experiment` print is a whole sentence."""

from __future__ import annotations

import re

import pytest
from conftest import cli

from anomalab.cli import _experiment_doc, _experiments, _whole_sentence


def whole(text: str) -> bool:
    """Ends with a sentence end and leaves no bracket or quote open."""
    return (bool(text) and text[-1] in ".!?" and text.count("(") == text.count(")")
            and text.count('"') % 2 == 0 and not text.endswith(":."))


def test_whole_sentence_cuts_back_to_the_last_whole_sentence():
    assert _whole_sentence("One sentence.\n  Another one here") == "One sentence."
    assert _whole_sentence("The four experiments:") == "The four experiments."
    assert _whole_sentence("Done (see x.py).") == "Done (see x.py)."
    assert not whole("Deep metric learning on the textures:")  # the check itself catches a cut line


@pytest.mark.parametrize("name", _experiments())
def test_experiment_descriptions_are_whole_sentences(name):
    assert whole(_experiment_doc(name)), _experiment_doc(name)


def test_listed_descriptions_are_whole_sentences():
    code, out = cli("experiment")
    assert code == 0
    lines = [line for line in out.splitlines()[2:] if line.strip()]
    assert len(lines) == len(_experiments())
    for line in lines:
        assert whole(line.split(None, 1)[1]), line
    code, out = cli("list")
    assert code == 0
    docs = out.splitlines()[0::2]  # name + description, then its parameters
    assert docs and all(whole(re.split(r"\s{2,}", d.strip(), maxsplit=1)[1]) for d in docs), docs
