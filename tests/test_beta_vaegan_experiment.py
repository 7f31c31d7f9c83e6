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


def _student_row(gamma, corr, overrides=None, seed=0):
    stage = exp._student_stage_name(gamma, seed, overrides or {})
    return {"stage": stage, "model": "student", "gamma": gamma, "seed": seed, "overrides": overrides or {},
            "steps": 3000, "batch_size": 32, "train_cpu_s": 600.0, "d_acc_5": 0.7, "d_acc_6": 0.65,
            "correspondence": corr}


def test_every_stored_setting_is_tabled_and_plotted(tmp_path):
    res = exp.Results(tmp_path / "results.jsonl")
    res.add(_student_row(1.0, 0.9))
    res.add(_student_row(0.0, 0.0, {"w_kd": 30.0}))
    res.add(_student_row(1.0, 0.25, {"w_kd": 30.0}))
    groups = exp.student_rows(exp.Results(tmp_path / "results.jsonl"))  # reloaded from the file
    assert list(groups) == ["", ", w_kd=30"]  # the budget first
    assert list(groups[", w_kd=30"]) == [(0.0, 0), (1.0, 0)]
    args = argparse.Namespace(out=tmp_path, pool_size=10_000, overrides={})  # the table of a plain rerun
    text = exp.write_table(args, res)
    assert "| student gamma=0, w_kd=30 | 0.700 | 0.650 | 0.00 | 0.826 / 0.667 / 0.00 |" in text
    assert "| student gamma=1 | 0.700 | 0.650 | 0.90 |" in text
    png = exp.correspondence_figure(res, tmp_path / "correspondence.png")
    assert png.is_file() and png.stat().st_size > 5_000


def test_no_students_no_figure(tmp_path):
    assert exp.correspondence_figure(exp.Results(tmp_path / "r.jsonl"), tmp_path / "c.png") is None
