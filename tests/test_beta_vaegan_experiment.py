"""The beta-VAEGAN experiment's cell naming: every student parameter that differs from its budget is in
the stage name, so cells with other settings never overwrite (or get mistaken for) the default ones."""

import argparse

import numpy as np
import pytest
import torch

from anomalab.errors import ParameterError
from anomalab.experiments import beta_vaegan_dsprites as exp
from anomalab.runs.store import ResultStore


def _args(**kw):
    base = dict(student_warmup=0, added_logvar_init=None, w_kd=exp.STUDENT["w_kd"], student_set=[], added_poses="fixed")
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


def test_source_objective_sets_eqs_1_to_5_weights_and_names_its_cells():
    o = exp.student_overrides(_args(source_objective=True))
    # the budget's w_kd = w_adv = 100 back to 1, the pixel BCE and the wrong-label D term off; w_feature is
    # already 1 (not an override)
    assert o == {"w_kd": 1.0, "w_adv": 1.0, "w_pixel": 0.0, "w_mismatch": 0.0}
    assert exp._student_stage_name(1.0, 0, o) == "student_g1_s0_w_adv1_kd1_w_mismatch0_w_pixel0"
    assert exp.student_overrides(_args(source_objective=True, student_set=["w_pixel=0.5"]))["w_pixel"] == 0.5


@pytest.mark.parametrize("item, message", [("w_adv", "not key=value"), ("nope=1", "no parameter 'nope'"),
                                           ("w_adv=ten", "w_adv must be a number, got 'ten'"),
                                           ("w_adv=-1", "w_adv must be >= 0")])
def test_bad_student_set_is_one_parameter_error(item, message):
    with pytest.raises(ParameterError, match=message) as err:
        exp.student_overrides(_args(student_set=[item]))
    assert "\n" not in str(err.value)


def test_a_bad_student_value_fails_before_the_teacher_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(exp, "teacher_stage", lambda *a: pytest.fail("trained despite a bad --student-set"))
    with pytest.raises(ParameterError, match="beta_vaegan student: w_kd"):
        exp.main(["--out", str(tmp_path), "--student-set", "w_kd=lots"])
    assert not (tmp_path / "results.jsonl").exists()


def _votes(colour_row):
    """A metric6 vote matrix [factor][dim] whose colour row (the last factor) is `colour_row`."""
    return {"votes": [[0] * 6 for _ in range(5)] + [list(colour_row)]}


def _student_row(gamma, corr, overrides=None, seed=0, d5=0.7):
    stage = exp._student_stage_name(gamma, seed, overrides or {})
    return {"stage": stage, "model": "student", "gamma": gamma, "seed": seed, "overrides": overrides or {},
            "steps": 3000, "batch_size": 32, "train_cpu_s": 600.0, "d_acc_5": d5, "d_acc_6": 0.65,
            "correspondence": corr, "metric6": _votes([5, 0, 0, 0, 0, 3])}


def test_colour_votes_name_the_top_dim_and_the_added_one():
    assert exp.colour_votes({"metric6": _votes([224, 186, 101, 189, 131, 0])}) == "z1 224, z6 0 (831)"
    assert exp.colour_votes({"metric6": _votes([1, 2, 0, 0, 0, 97])}) == "z6 97 (100)"  # the added dim on top


def test_seeds_of_a_setting_are_summarised_as_mean_and_std(tmp_path):
    res = exp.open_store(tmp_path, exp.KEY)
    for seed, d5 in enumerate((0.70, 0.80, 0.90)):
        res.add(_student_row(1.0, 0.5 * seed, seed=seed, d5=d5))
    res.add(_student_row(0.0, 0.0))  # one seed: no summary row
    args = argparse.Namespace(out=tmp_path, pool_size=10_000, overrides={})
    text = "\n".join(exp.table_lines(res, args))
    # recomputed by hand: mean 0.8, population std sqrt(2/3) * 0.1 = 0.082; correspondence 0.5 +- 0.41
    assert "| gamma=1 | 0.800 ± 0.082 | 0.650 ± 0.000 | 0.50 ± 0.41 | 3 | 0.808 / 0.840 / 1.00 |" in text
    assert "| gamma=0 |" not in text


def test_every_stored_setting_is_tabled_and_plotted(tmp_path):
    res = exp.open_store(tmp_path, exp.KEY)
    res.add(_student_row(1.0, 0.9))
    res.add(_student_row(0.0, 0.0, {"w_kd": 30.0}))
    res.add(_student_row(1.0, 0.25, {"w_kd": 30.0}))
    groups = exp.student_rows(ResultStore(tmp_path / "results.jsonl", exp.KEY))  # reloaded from the file
    assert list(groups) == ["", ", w_kd=30"]  # the budget first
    assert list(groups[", w_kd=30"]) == [(0.0, 0), (1.0, 0)]
    args = argparse.Namespace(out=tmp_path, pool_size=10_000, overrides={})  # the table of a plain rerun
    text = "\n".join(exp.table_lines(res, args))
    assert "| student gamma=0, w_kd=30 | 0.700 | 0.650 | 0.00 | z1 5, z6 3 (8) | 0.826 / 0.667 / 0.00 |" in text
    assert "| student gamma=1 | 0.700 | 0.650 | 0.90 |" in text
    png = exp.correspondence_figure(res, tmp_path / "correspondence.png")
    assert png.is_file() and png.stat().st_size > 5_000


def test_no_students_no_figure(tmp_path):
    assert exp.correspondence_figure(ResultStore(tmp_path / "r.jsonl", exp.KEY), tmp_path / "c.png") is None


def test_stage_rows_of_earlier_runs_still_load(tmp_path):
    """results.jsonl as the teacher stage writes it (and a last line cut by a kill) loads by stage."""
    (tmp_path / "results.jsonl").write_text(
        '{"stage": "teacher_track_1000", "model": "teacher", "step": 1000, "quick_factor_vae": 0.645}\n'
        '{"stage": "teacher", "model": "teacher", "seed": 0, "steps": 2000, "d_acc_5": 0.7}\n{"stage": "tea')
    res = exp.open_store(tmp_path, exp.KEY)
    assert ("teacher",) in res and ("teacher_track_1000",) in res and len(res) == 2
    assert exp.stored(res, "teacher")["d_acc_5"] == 0.7 and exp.stored(res, "teacher_warmup") is None


def test_teacher_objective_option_starts_a_tc_teacher_and_refuses_a_folder_of_another(tmp_path):
    from argparse import Namespace

    from anomalab.errors import ParameterError
    from anomalab.experiments.beta_vaegan_dsprites import _load_or_start_teacher

    args = Namespace(teacher_steps=2, seed=0, device="cpu", progress=False, teacher_objective="beta_tcvae",
                     teacher_beta=6.0)
    t = _load_or_start_teacher(tmp_path / "teacher", args)
    assert (t.objective, t.beta, t.steps) == ("beta_tcvae", 6.0, 2)
    t.train_more(1)
    t.save(tmp_path / "teacher")
    again = _load_or_start_teacher(tmp_path / "teacher", args)
    assert again.steps_done_ == 1 and again.objective == "beta_tcvae"
    plain = Namespace(**{**vars(args), "teacher_objective": "beta_vae", "teacher_beta": None})
    with pytest.raises(ParameterError, match="holds a teacher trained with"):
        _load_or_start_teacher(tmp_path / "teacher", plain)


def test_factor_vae_teacher_with_warmup_through_the_experiment_options(tmp_path):
    """--teacher-objective factor_vae --teacher-warmup N: a FactorVAE teacher whose TC weight ramps up over N
    steps, saved with it and resumed by a later run."""
    from argparse import Namespace

    from anomalab.experiments.beta_vaegan_dsprites import _load_or_start_teacher

    args = Namespace(teacher_steps=3, seed=0, device="cpu", progress=False, teacher_objective="factor_vae",
                     teacher_beta=35.0, teacher_warmup=100)
    t = _load_or_start_teacher(tmp_path / "teacher", args)
    assert (t.objective, t.beta, t.kl_warmup_steps) == ("factor_vae", 35.0, 100) and t.tc_disc_ is not None
    t.train_more(3)
    assert t.beta_now == pytest.approx(35.0 * 3 / 100)
    t.save(tmp_path / "teacher")
    again = _load_or_start_teacher(tmp_path / "teacher", args)
    assert (again.steps_done_, again.kl_warmup_steps, again.objective) == (3, 100, "factor_vae")


def test_teacher_curves_are_drawn_from_tracked_runs_and_labelled_by_their_teacher(tmp_path):
    import json

    from anomalab.errors import DataError
    from anomalab.experiments.beta_vaegan_dsprites import _teacher_label, main
    from anomalab.generate.beta_vaegan.teacher import BetaVAE

    t = BetaVAE(batch_size=8, objective="factor_vae", beta=35.0, kl_warmup_steps=100, tc_width=16).start()
    t.progress = False
    t.save(tmp_path / "fv" / "teacher")
    rows = [{"stage": f"teacher_track_{s}", "model": "teacher", "step": s, "quick_factor_vae": q}
            for s, q in ((1000, 0.5), (2000, 0.6))]
    for run in ("fv", "plain"):
        (tmp_path / run).mkdir(exist_ok=True)
        (tmp_path / run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _teacher_label(tmp_path / "fv") == "FactorVAE, gamma 35, TC weight ramped over 100 steps"
    assert _teacher_label(tmp_path / "plain") == "plain"  # no saved teacher: the folder's name
    main(["--curves", str(tmp_path / "fv"), str(tmp_path / "plain"), "--out", str(tmp_path / "fig")])
    assert (tmp_path / "fig" / "teacher_curves.png").stat().st_size > 10_000
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no teacher_track rows"):
        main(["--curves", str(tmp_path / "empty"), "--out", str(tmp_path / "fig")])


def test_a_given_teacher_is_used_as_saved_and_never_written(tmp_path):
    import hashlib

    import torch

    from anomalab.experiments._common import open_store
    from anomalab.generate.beta_vaegan.teacher import BetaVAE

    saved = tmp_path / "teacher_kept"
    t = BetaVAE(batch_size=8, seed=3).start()
    t.progress = False
    t.train_more(2)
    t.save(saved)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in saved.iterdir()}
    out = tmp_path / "out"
    args = argparse.Namespace(teacher=saved, device="cpu", progress=False, out=out, pool_size=0, track=False)
    res = open_store(out, exp.KEY)
    res.add({"stage": "teacher", "model": "teacher", "teacher_path": str(saved), "d_acc_5": 0.5, "steps": 2,
             "batch_size": 8, "seed": 3})  # scored before, as teacher_stage stores a given teacher
    got = exp.teacher_stage(args, res)
    assert got.steps_done_ == 2 and not (out / "teacher").exists()  # nothing trained in --out
    x = torch.rand(4, 1, 64, 64)
    torch.testing.assert_close(got.encode(x), t.encode(x), rtol=0, atol=0)
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in saved.iterdir()}
    # the table names the teacher's objective; a given teacher without a training time shows "-"
    row = "\n".join(exp.table_lines(res, args))
    assert "| teacher (beta_vae) | 0.500 |" in row and "| 2 x 8 | - | 3 |" in row
    # an --out whose students came from another teacher is refused, either way round
    other = open_store(tmp_path / "other", exp.KEY)
    other.add({"stage": "teacher", "model": "teacher", "d_acc_5": 0.6})  # a teacher trained in that --out
    with pytest.raises(ParameterError, match="distilled from the teacher trained in"):
        exp.teacher_stage(argparse.Namespace(**{**vars(args), "out": tmp_path / "other"}), other)
    with pytest.raises(ParameterError, match="no saved teacher there"):
        exp.given_teacher(argparse.Namespace(**{**vars(args), "teacher": tmp_path / "nothing"}))


def test_teacher_only_scores_a_given_teacher_and_names_each_factors_dimension(tmp_path, capsys):
    from anomalab.generate.beta_vaegan.teacher import BetaVAE

    t = BetaVAE(batch_size=8, seed=0).start()
    t.progress = False
    t.train_more(2)
    t.save(tmp_path / "t")
    exp.main(["--teacher", str(tmp_path / "t"), "--teacher-only", "--pool-size", "2000", "--out", str(tmp_path / "o")])
    text = capsys.readouterr().out
    row = ResultStore(tmp_path / "o" / "results.jsonl", exp.KEY).get(("teacher",))
    assert row["teacher_path"] == str(tmp_path / "t") and 0 <= row["d_acc_5"] <= 1
    assert f"teacher FactorVAE {row['d_acc_5']:.3f}" in text
    for name in ("shape", "scale", "orientation", "pos_x", "pos_y"):
        assert f"  {name}" in text and "-> z" in text
    assert not any((tmp_path / "o").glob("student_*"))  # nothing distilled


def test_report_only_rebuilds_the_table_from_stored_rows_without_training(tmp_path, monkeypatch):
    from anomalab.experiments._common import open_store

    res = open_store(tmp_path, exp.KEY)
    res.add({"stage": "teacher", "model": "teacher", "d_acc_5": 0.8, "steps": 43000, "batch_size": 64, "seed": 0,
             "objective": "factor_vae", "train_cpu_s": 60.0})
    res.add({"stage": "student_g1_s0", "model": "student", "gamma": 1.0, "seed": 0, "overrides": {}, "steps": 3000,
             "batch_size": 32, "train_cpu_s": 300.0, "d_acc_5": 0.74, "d_acc_6": 0.61, "correspondence": 0.0})
    monkeypatch.setattr(exp, "student_stage", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(exp, "teacher_stage", lambda *a, **k: pytest.fail("trained"))
    exp.main(["--out", str(tmp_path), "--report-only"])
    table = (tmp_path / "results.md").read_text()
    assert "| teacher (factor_vae) | 0.800 |" in table and "0.740" in table
    assert (tmp_path / "correspondence.png").is_file()
    with pytest.raises(ParameterError, match="no results"):
        exp.main(["--out", str(tmp_path / "empty"), "--report-only"])


def test_added_data_at_every_pose_keeps_the_sprites_and_shares_a_pose_across_colour_levels():
    from anomalab.data.dsprites import FACTOR_SIZES, added_factors

    fixed, every = added_factors(), added_factors(poses="all")
    assert np.array_equal(fixed[:, [0, 3, 4, 5]], every[:, [0, 3, 4, 5]])  # same shapes, positions, colours
    assert set(fixed[:, 1]) == {5} and set(fixed[:, 2]) == {0}
    bases = every.reshape(-1, 5, 6)  # a (shape, position) base in its five colour levels
    assert (bases[:, :, 5] == np.arange(1, 6)).all() and (bases[:, :, 1:3] == bases[:, :1, 1:3]).all()
    assert set(every[:, 1]) == set(range(FACTOR_SIZES[1])) and len(set(every[:, 2])) == FACTOR_SIZES[2]
    assert np.array_equal(every, added_factors(poses="all"))  # seeded
    with pytest.raises(ParameterError, match="poses must be"):
        added_factors(poses="some")


def test_added_poses_is_named_in_the_stage_but_not_passed_to_the_model():
    o = exp.student_overrides(_args(source_objective=True, added_poses="all"))
    assert o["added_poses"] == "all"
    assert exp._student_stage_name(1.0, 0, o) == "student_g1_s0_added_posesall_w_adv1_kd1_w_mismatch0_w_pixel0"
    assert "added_poses" not in exp._model_params(o)
    assert "added_poses" not in exp.student_overrides(_args(added_poses="fixed"))


class _ColourCoder:
    """A stand-in encoder: z1 = the colour level (G channel of the sprite), z2 = the x position, z3 = both."""

    def encode(self, images):
        sprite = images.amax(1)  # (N, 64, 64)
        on = sprite > 0.5
        g = (images[:, 1] * on).sum((1, 2)) / on.sum((1, 2))
        cols = on.float().mean(1)  # column profile
        x = (cols * torch.arange(64.0)).sum(1) / cols.sum(1)
        return torch.stack([g, x / 64, g + x / 64], 1)


def test_colour_probe_gives_a_colour_only_dim_share_one_and_a_pose_dim_share_zero():
    r = exp.colour_probe(_ColourCoder(), n=40)
    share = r["colour_share"]
    assert share[0] == pytest.approx(1.0) and share[1] == pytest.approx(0.0, abs=1e-9)
    assert 0.05 < share[2] < 0.95  # colour and position mixed
    levels = np.array(r["code_by_level"])[:, 0]
    assert levels[0] == pytest.approx(1.0) and np.all(np.diff(levels) < 0)  # white G = 1, falling toward red
