"""The beta-VAEGAN experiment's cell naming: every student parameter that differs from its budget is in
the stage name, so cells with other settings never overwrite (or get mistaken for) the default ones."""

import argparse

import pytest

from anomalab.experiments import beta_vaegan_dsprites as exp


def _args(**kw):
    base = dict(student_warmup=0, added_logvar_init=None, w_kd=exp.STUDENT["w_kd"], student_set=[])
    return argparse.Namespace(**{**base, **kw})


def test_default_cells_have_plain_names():
    assert exp.student_overrides(_args()) == {}
    assert exp._student_stage_name(1.0, 0, {}) == "student_g1_s0"
    # setting a parameter to its budget value is no override
    assert exp.student_overrides(_args(student_set=[f"w_adv={exp.STUDENT['w_adv']:g}"])) == {}


def test_overrides_are_named_and_described():
    o = exp.student_overrides(_args(w_kd=1.0, student_warmup=200, student_set=["w_adv=1", "w_pixel=0"]))
    assert o == {"w_kd": 1.0, "kl_warmup_steps": 200, "w_adv": 1.0, "w_pixel": 0}
    assert exp._student_stage_name(5.0, 1, o) == "student_g5_s1_w200_w_adv1_kd1_w_pixel0"
    assert exp._describe(o) == ", kl_warmup_steps=200, w_adv=1, w_kd=1, w_pixel=0"


@pytest.mark.parametrize("item", ["w_adv", "nope=1"])
def test_bad_student_set_is_a_clear_error(item):
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        exp.student_overrides(_args(student_set=[item]))
