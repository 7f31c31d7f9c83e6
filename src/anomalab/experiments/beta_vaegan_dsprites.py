"""beta-VAEGAN on dSprites (Akita & Taguchi): Table 1 (gamma sweep), latent traversals, AUROC vs anomaly degree.

Stages (each resumable: finished rows in results.jsonl and saved models are skipped on a rerun):
1. teacher: a beta-VAE (latent 5, beta 4, Burgess net) on dSprites; FactorVAE score on the 5 factors.
2. students: beta-VAEGAN (latent 5 + 1) for each gamma and seed, trained on white dSprites (y = 0) and
   the 15,360 coloured images (y = 1); FactorVAE score on the 5 original factors (white images), on all
   6 factors (colour as sixth factor), and the added-factor correspondence (100 colour votes).
3. figures: traversals of teacher vs student (gamma = 1); pseudo-anomalies at increasing degree scored by
   a PCA detector fitted on normal (white) sprites: AUROC vs degree for every gamma.
4. results.md and correspondence.png: every student stored in results.jsonl, whatever its setting (rows
   of several runs can be merged into one folder), beside the source's Table 1.

The default budget fits a shared 2-core CPU (stated beside every number in results.md); `--paper` runs a
long schedule of ours (the source gives none) with the exact (non-pooled) metric, on a GPU when present.
Method and results: docs/beta_vaegan.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from anomalab.data.dsprites import (
    ADDED_ORIENTATION_INDEX,
    ADDED_POSES,
    ADDED_SCALE_INDEX,
    FACTOR_NAMES,
    ColouredDSprites,
    DSprites,
    WhiteDSprites,
    added_set,
)
from anomalab.errors import DataError, ParameterError
from anomalab.experiments._common import (
    Clock,
    fmt,
    markdown_table,
    mean_std,
    open_store,
    parser,
    pyplot,
    save_figure,
    write_table,
)
from anomalab.generate.beta_vaegan import BetaVAE, BetaVAEGAN
from anomalab.metrics import image_auroc
from anomalab.metrics.disentangle import (
    LIB_VARIANT,
    QUICK_VARIANT,
    EncodedPool,
    factor_correspondence,
    factor_vae_score,
)
from anomalab.params import parse_items, signature_defaults, validate
from anomalab.runs.store import ResultStore
from anomalab.types import ImageSet

# ---- settings --------------------------------------------------------------------------------------
TEACHER = dict(latent_dim=5, beta=4.0, steps=2000, batch_size=64, lr=5e-4)  # beta-VAE of Burgess et al. 2018
# students: w_kd = 100 and w_adv = 100 are ours for this budget (the source's weights are 1; see
# docs/beta_vaegan.md: our under-trained teacher leaves slack dims that a weight-1 L_KD does not pin,
# and our summed reconstruction drowns a weight-1 L_GAN); `--w-kd 1 --student-set w_adv=1` runs eq. 1 as is
STUDENT = dict(latent_dim=5, added_dims=1, beta=4.0, steps=3000, batch_size=32, lr=5e-4, lr_d=2e-4,
               w_kd=100.0, w_adv=100.0)
PAPER_TEACHER_STEPS, PAPER_STUDENT_STEPS = 300_000, 50_000  # disentanglement_lib's 300k steps; ours
# --source-objective: the students' loss exactly as eqs. 1-5 state it: every weight 1, L_vae with the
# discriminator-feature reconstruction only (no pixel BCE), D with eq. 4's three terms (no wrong-label term)
SOURCE_OBJECTIVE = {"w_kd": 1.0, "w_adv": 1.0, "w_feature": 1.0, "w_pixel": 0.0, "w_mismatch": 0.0}
GAMMAS = (0.0, 1.0, 5.0, 10.0)  # weight of the filtered-prior GAN term (eq. 4): the source's sweep
SEEDS = (0,)  # student seeds (the teacher has its own, --seed)
METRIC = dict(LIB_VARIANT)  # 10,000 train / 5,000 eval votes, L = 64, variances from 10,000 samples
POOL_SIZE = 30_000  # pooled votes: encode 30,000 images once instead of 970,000 (metrics.disentangle)
TRACK_EVERY = 1000  # teacher steps between progress checks (quick metric: 1,000 / 500 votes, pool 10,000)
WARMUP_STEPS = 1000  # option --warmup-teacher: beta ramps up from 0 over these steps
CORRESPONDENCE_VOTES = 100  # colour votes behind the added-factor correspondence
PROBE_SPRITES = 500  # sprites rendered in every colour level by the colour probe
DEGREES = (-1.0, 0.0, 1.0, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0)  # values of the added dim z6 in the degree study
N_DEGREE_IMAGES = 500  # normal sprites turned into pseudo-anomalies at each degree
ADDED_RANGE = (0.0, 4.0)  # traversal of the added dim over the source's positive range (z1..z5 span -2 .. 2)
SOURCE_TABLE1 = {  # the source's Table 1: D-acc (5 original), D-acc (all 6), correspondence
    "teacher": (0.804, None, None), 0.0: (0.826, 0.667, 0.00), 1.0: (0.808, 0.840, 1.00),
    5.0: (0.816, 0.847, 1.00), 10.0: (0.766, 0.735, 1.00),
}
KEY = ("stage",)  # what identifies a row of results.jsonl (teacher, student_g1_s0, degree_g1, ...)


def stored(res: ResultStore, name: str) -> dict | None:
    """The stored row of stage `name`, or None."""
    return res.get((name,))


# ---- run -------------------------------------------------------------------------------------------
def _metric(model, data, seed: int, args, pool: EncodedPool | None = None) -> tuple[dict, EncodedPool | None]:
    rng = np.random.default_rng(seed)
    if pool is None and args.pool_size:
        pool = EncodedPool.build(model.encode, data, rng, args.pool_size)
    r = factor_vae_score(model.encode, data, rng, pool=pool, **METRIC)
    return {"eval_accuracy": r.eval_accuracy, "train_accuracy": r.train_accuracy,
            "num_active_dims": r.num_active_dims, "votes": r.votes.tolist(),
            "classifier": r.classifier.tolist()}, pool


def time_spent(folder: Path) -> dict:
    """The training CPU / wall seconds kept in a saved model's time.json ({} without one)."""
    tf = Path(folder) / "time.json"
    return json.loads(tf.read_text()) if tf.is_file() else {}


def _train_chunks(model, target: int, path: Path, track=None) -> dict:
    """Train `model` to `target` steps in chunks, saving after each; CPU/wall seconds kept in time.json."""
    tf = path / "time.json"
    spent = {"cpu_s": 0.0, "wall_s": 0.0, **time_spent(path)}
    while model.steps_done_ < target:
        with Clock() as c:
            model.train_more(min(TRACK_EVERY if track else 250, target - model.steps_done_))
        spent["cpu_s"] += c.cpu_s
        spent["wall_s"] += c.wall_s
        model.save(path)
        tf.write_text(json.dumps(spent))
        if track:
            track(model)
    return spent


def _load_or_start_teacher(path: Path, args, **params) -> BetaVAE:
    """The teacher saved at `path` (to be trained further up to args.teacher_steps), or a new one; its
    objective and beta are `--teacher-objective` / `--teacher-beta` (a saved teacher of another objective
    is refused: its folder belongs to another run)."""
    wanted = {"objective": getattr(args, "teacher_objective", "beta_vae"),
              "beta": getattr(args, "teacher_beta", None) or TEACHER["beta"],
              "tc_estimator": getattr(args, "teacher_tc_estimator", "mws")}
    if (path / "model.json").is_file():
        teacher = BetaVAE.load(path, device=args.device)
        found = {"objective": teacher.objective, "beta": teacher.beta, "tc_estimator": teacher.tc_estimator}
        if found != wanted:
            raise ParameterError(f"{path} holds a teacher trained with {found}, not {wanted}: choose another --out "
                                 "(or the options it was trained with)")
    else:
        if getattr(args, "teacher_warmup", 0):  # --teacher-warmup: beta (on the TC where it weighs the TC) ramps up
            params.setdefault("kl_warmup_steps", int(args.teacher_warmup))
        if getattr(args, "teacher_tc_width", None):
            params.setdefault("tc_width", int(args.teacher_tc_width))
        teacher = BetaVAE(**{**TEACHER, **wanted, "steps": args.teacher_steps, **params}, seed=args.seed,
                          device=args.device)
        teacher.start()
    teacher.progress = args.progress
    return teacher


def given_teacher(args) -> BetaVAE | None:
    """--teacher PATH: that saved teacher, read and never written (no further training); None without it."""
    if not getattr(args, "teacher", None):
        return None
    path = Path(args.teacher)
    if not (path / "model.json").is_file():
        raise ParameterError(f"--teacher {path}: no saved teacher there (model.json missing)")
    teacher = BetaVAE.load(path, device=args.device)
    teacher.progress = args.progress
    return teacher


def teacher_summary(row: dict) -> str:
    """One line per factor of a stored teacher row: the latent dimension most of its eval votes went to and
    that share, after the score (FactorVAE metric: each vote names the dim of least normalised variance)."""
    m = row["metric5"]
    votes = np.asarray(m["votes"])  # (factors, dims)
    lines = [f"teacher FactorVAE {m['eval_accuracy']:.3f} (train {m['train_accuracy']:.3f}, "
             f"{m['num_active_dims']} active dims)"]
    for name, v in zip(FACTOR_NAMES, votes, strict=True):
        d = int(v.argmax())
        lines.append(f"  {name:12s} -> z{d + 1}  ({v[d] / max(v.sum(), 1):.0%} of its votes; dim mapped to "
                     f"{FACTOR_NAMES[int(m['classifier'][d])]})")
    return "\n".join(lines)


def teacher_stage(args, res: ResultStore) -> BetaVAE:
    path = args.out / "teacher"
    given = given_teacher(args)
    stored_row = res.get(("teacher",))
    before = None if stored_row is None else stored_row.get("teacher_path")
    now = None if given is None else str(args.teacher)
    if stored_row is not None and before != now:  # the students stored there were distilled from another teacher
        raise ParameterError(f"{args.out} holds results distilled from "
                             f"{before or 'the teacher trained in ' + str(path)}, not from "
                             f"{now or 'a teacher trained there'}: choose another --out")
    if given is not None:
        if ("teacher",) not in res:
            row = _teacher_row(res, "teacher", given, given.seed, time_spent(args.teacher), args,
                               teacher_path=str(args.teacher),
                               objective=given.objective)
            print(f"teacher {args.teacher}: FactorVAE {row['d_acc_5']:.3f} ({given.steps_done_} steps)")
        return given
    teacher = _load_or_start_teacher(path, args)

    def track(m):
        with Clock() as c:
            q, _ = _metric(m, DSprites(), 100 + m.steps_done_, args_quick(args))
        res.add({"stage": f"teacher_track_{m.steps_done_}", "model": "teacher", "step": m.steps_done_,
                 "quick_factor_vae": q["eval_accuracy"], "metric_cpu_s": c.cpu_s})
        print(f"teacher step {m.steps_done_}: FactorVAE (quick 1,000/500 votes) {q['eval_accuracy']:.3f}")

    spent = _train_chunks(teacher, args.teacher_steps, path, track if args.track else None)
    if ("teacher",) not in res:
        row = _teacher_row(res, "teacher", teacher, args.seed, spent, args)
        print(f"teacher: FactorVAE {row['d_acc_5']:.3f} ({teacher.steps_done_} steps)")
    return teacher


def _teacher_row(res: ResultStore, stage: str, teacher: BetaVAE, seed: int, spent: dict, args, **extra) -> dict:
    """Score `teacher` with the full metric and store its row under `stage` (spent: its training CPU / wall
    seconds, {} when unknown)."""
    with Clock() as c:
        m, _ = _metric(teacher, DSprites(), 1, args)
    return res.add({"stage": stage, "model": stage, "seed": seed, "steps": teacher.steps_done_,
                    "batch_size": teacher.batch_size, "train_cpu_s": spent.get("cpu_s"),
                    "train_wall_s": spent.get("wall_s"), "d_acc_5": m["eval_accuracy"], "metric5": m,
                    "metric_cpu_s": c.cpu_s, "pool_size": args.pool_size, **extra})


def warmup_teacher_stage(args, res: ResultStore) -> None:
    """Option: the same teacher with beta ramped up from 0 over WARMUP_STEPS (reported beside the plain one)."""
    path = args.out / "teacher_warmup"
    teacher = _load_or_start_teacher(path, args, kl_warmup_steps=WARMUP_STEPS)
    spent = _train_chunks(teacher, args.teacher_steps, path)
    if ("teacher_warmup",) not in res:
        _teacher_row(res, "teacher_warmup", teacher, args.seed, spent, args, kl_warmup_steps=WARMUP_STEPS)


def pool_check_stage(args, res: ResultStore, teacher: BetaVAE) -> None:
    """The pooled estimate against exact sampling on the teacher, both with 1,000 / 500 votes."""
    if ("teacher_pool_check",) in res or not args.pool_size:
        return
    exact = factor_vae_score(teacher.encode, DSprites(), np.random.default_rng(7), **QUICK_VARIANT)
    pooled = factor_vae_score(teacher.encode, DSprites(), np.random.default_rng(7), pool_size=args.pool_size,
                              **QUICK_VARIANT)
    res.add({"stage": "teacher_pool_check", "exact_quick": exact.eval_accuracy,
             "pooled_quick": pooled.eval_accuracy, "pool_size": args.pool_size})


def args_quick(args):
    quick = argparse.Namespace(**vars(args))
    quick.pool_size = 10_000 if args.pool_size else 0
    return quick


_SUFFIX = {"kl_warmup_steps": "w", "w_kd": "kd"}  # short stage-name tags of the older flags


def student_overrides(args) -> dict:
    """Student parameters that differ from STUDENT: the shortcut flags, then every --student-set KEY=VALUE
    (later wins), each converted and checked against BetaVAEGAN's parameters: a bad one is one
    ParameterError naming it."""
    shortcuts = {}
    if args.student_warmup:
        shortcuts["kl_warmup_steps"] = args.student_warmup
    if args.added_logvar_init is not None:
        shortcuts["added_logvar_init"] = args.added_logvar_init
    if args.w_kd != STUDENT["w_kd"]:
        shortcuts["w_kd"] = args.w_kd
    if getattr(args, "source_objective", False):  # eqs. 1-5 as the source states them (Table 1's row (a))
        shortcuts.update(SOURCE_OBJECTIVE)
    given = {**shortcuts, **parse_items(args.student_set, what="--student-set")}
    values = validate(BetaVAEGAN, given, owner="beta_vaegan student")
    defaults = {**signature_defaults(BetaVAEGAN), **STUDENT}
    out = {k: v for k, v in values.items() if defaults[k] != v}
    if getattr(args, "added_poses", "fixed") != "fixed":  # a data setting, named in the stage like the others
        out["added_poses"] = args.added_poses
    return out


DATA_SETTINGS = ("added_poses",)  # overrides that set the students' data, not a BetaVAEGAN parameter


def _model_params(overrides: dict) -> dict:
    return {k: v for k, v in overrides.items() if k not in DATA_SETTINGS}


def _added(overrides: dict) -> ImageSet:
    return added_set(poses=overrides.get("added_poses", "fixed"))


def _value(v) -> str:
    return f"{v:g}" if isinstance(v, float) else f"{v}"


def _tags(overrides: dict) -> str:
    return "".join(f"_{_SUFFIX.get(k, k)}{_value(v)}" for k, v in sorted(overrides.items()))


def _student_stage_name(gamma: float, seed: int, overrides: dict) -> str:
    """Stage (and folder) name of a student cell; every parameter that differs from STUDENT is in it."""
    return f"student_g{gamma:g}_s{seed}{_tags(overrides)}"


def _describe(overrides: dict) -> str:
    return "".join(f", {k}={_value(v)}" for k, v in sorted(overrides.items()))


def student_stage(args, res: ResultStore, teacher: BetaVAE, gamma: float, seed: int) -> BetaVAEGAN:
    overrides = args.overrides
    stage = _student_stage_name(gamma, seed, overrides)
    path = args.out / stage
    if (path / "model.json").is_file():
        student = BetaVAEGAN.load(path, device=args.device)
        student.set_training_data(teacher, _added(overrides))
    else:
        student = BetaVAEGAN(**{**STUDENT, "steps": args.student_steps, **_model_params(overrides)}, gamma=gamma,
                             seed=seed, device=args.device)
        student.progress = args.progress
        student.fit(teacher, _added(overrides), steps=0)
    student.progress = args.progress
    spent = _train_chunks(student, args.student_steps, path)
    if (stage,) not in res:
        with Clock() as c:
            m5, _ = _metric(student, WhiteDSprites(), 11 + seed, args)
            m6, pool = _metric(student, ColouredDSprites(), 12 + seed, args)
            corr = factor_correspondence(student.encode, ColouredDSprites(), np.random.default_rng(13 + seed),
                                         factor=5, dim=student.added_dim, num_votes=CORRESPONDENCE_VOTES,
                                         pool=pool)
        row = res.add({"stage": stage, "model": "student", "gamma": gamma, "seed": seed,
                       "overrides": overrides, "steps": student.steps_done_, "batch_size": student.batch_size,
                       "train_cpu_s": spent["cpu_s"], "train_wall_s": spent["wall_s"],
                       "d_acc_5": m5["eval_accuracy"], "d_acc_6": m6["eval_accuracy"], "correspondence": corr,
                       "metric5": m5, "metric6": m6, "metric_cpu_s": c.cpu_s, "pool_size": args.pool_size,
                       "last_losses": student.history_[-1]})
        print(f"student gamma={gamma:g} seed={seed}: D-acc 5 {row['d_acc_5']:.3f}, all 6 {row['d_acc_6']:.3f}, "
              f"correspondence {corr:.2f}")
    return student


def colour_probe(student: BetaVAEGAN, n: int = PROBE_SPRITES, added_pose: bool = False, seed: int = 31) -> dict:
    """Which latent dimensions move with colour: n sprites, each rendered in all six colour levels (other
    factors fixed), encoded; per dimension the share of its variance that is within-sprite variance across
    the colour levels (1 = the dim changes only with colour, 0 = not at all), and its mean code per level.
    added_pose: the sprites at the added data's scale and orientation (the only pose coloured sprites are
    trained at); otherwise every factor is drawn uniformly, as the metric draws them."""
    data = ColouredDSprites()
    levels = data.factor_sizes[-1]
    f5 = DSprites().sample_factors(n, np.random.default_rng(seed))
    if added_pose:
        f5[:, 1], f5[:, 2] = ADDED_SCALE_INDEX, ADDED_ORIENTATION_INDEX
    f = np.concatenate([np.repeat(f5, levels, axis=0), np.tile(np.arange(levels), n)[:, None]], axis=1)
    z = student.encode(data.images_from_factors(f)).numpy().reshape(n, levels, -1)
    within, total = z.var(axis=1).mean(axis=0), z.reshape(n * levels, -1).var(axis=0)
    return {"colour_share": (within / np.maximum(total, 1e-12)).tolist(), "code_by_level": z.mean(axis=0).tolist(),
            "n_sprites": n, "added_pose": added_pose}


def colour_probe_stage(args, res: ResultStore, students: dict[float, BetaVAEGAN]) -> None:
    """colour_probe of every gamma's first-seed student, over all poses and at the added data's pose."""
    for gamma, student in students.items():
        name = f"colour_probe_g{gamma:g}{_tags(args.overrides)}"
        if (name,) not in res:
            res.add({"stage": name, "gamma": gamma, "overrides": args.overrides, "seed": args.seeds[0],
                     "all_poses": colour_probe(student), "added_pose": colour_probe(student, added_pose=True)})


def degree_stage(args, res: ResultStore, students: dict[float, BetaVAEGAN]) -> tuple[dict, np.ndarray]:
    """AUROC vs degree for every gamma: pseudo-anomalies of `N_DEGREE_IMAGES` white sprites at each of
    DEGREES, scored by a PCA detector fitted on other white sprites. Returns (gamma -> curve, the sprites)."""
    from anomalab.registry import create

    rng = np.random.default_rng(21)
    white = WhiteDSprites()
    detector = create("pca", n_components=32, seed=0).fit(white.sample(2000, rng)[0])
    normal = white.sample(N_DEGREE_IMAGES, rng)[0]
    real_scores = detector.score(normal).numpy()
    on = normal[:, 0] > 0.5  # sprite pixels: redness = R - mean(G, B) there (white 0, red 1, gray 0)
    curves = {}
    for gamma, student in students.items():
        recon_scores = detector.score(student.decode(student.encode(normal))).numpy()
        rows = []
        for degree in DEGREES:
            fake = student.generate(normal, degree)
            s = detector.score(fake).numpy()
            labels = np.r_[np.zeros(len(s)), np.ones(len(s))]
            rows.append({"degree": degree, "auroc_vs_reconstruction": image_auroc(labels, np.r_[recon_scores, s]),
                         "auroc_vs_real": image_auroc(labels, np.r_[real_scores, s]),
                         "redness": float((fake[:, 0] - fake[:, 1:].mean(1))[on].mean())})
        curves[gamma] = rows
        name = f"degree_g{gamma:g}{_tags(args.overrides)}"
        if (name,) not in res:
            res.add({"stage": name, "gamma": gamma, "overrides": args.overrides,
                     "detector": "pca(n_components=32) on 2,000 white sprites",
                     "n_images": N_DEGREE_IMAGES, "curve": rows})
    return curves, normal


def check_settings(args) -> None:
    """Every teacher and student setting checked (ParameterError naming it) before anything trains."""
    args.overrides = student_overrides(args)
    validate(BetaVAE, {**TEACHER, "steps": args.teacher_steps, "seed": args.seed, "device": args.device},
             owner="beta_vae teacher")
    validate(BetaVAEGAN, {**STUDENT, "steps": args.student_steps, **_model_params(args.overrides),
                          "device": args.device},
             owner="beta_vaegan student")


def main(argv: list[str] | None = None) -> None:
    p = parser("beta_vaegan_dsprites", __doc__)
    p.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--seed", type=int, default=0, help="teacher seed")
    p.add_argument("--teacher-steps", type=int, default=TEACHER["steps"])
    p.add_argument("--student-steps", type=int, default=STUDENT["steps"])
    p.add_argument("--pool-size", type=int, default=POOL_SIZE, help="0 = exact metric sampling")
    p.add_argument("--paper", action="store_true",
                   help=f"long schedule: teacher {PAPER_TEACHER_STEPS:,} / student {PAPER_STUDENT_STEPS:,} steps, "
                        "exact metric, GPU when present")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--track", action="store_true", help="quick FactorVAE every 1,000 teacher steps")
    p.add_argument("--teacher", type=Path, default=None, metavar="PATH",
                   help="a saved teacher folder to distil from as it is (read only, not trained further), e.g. "
                        "docs/results/beta_vaegan/teacher_long/teacher; default: train one in --out/teacher")
    p.add_argument("--teacher-only", action="store_true",
                   help="stop after the teacher stage: its full FactorVAE score and each factor's majority dimension")
    p.add_argument("--teacher-objective", choices=("beta_vae", "beta_tcvae", "factor_vae"), default="beta_vae",
                   help="the teacher's objective: beta-VAE (Higgins et al.), beta-TCVAE (Chen et al. 2018) or "
                        "FactorVAE (Kim & Mnih 2018, TC from a discriminator)")
    p.add_argument("--teacher-beta", type=float, default=None,
                   help=f"the teacher's beta (default {TEACHER['beta']:g}; on the total correlation for beta_tcvae, "
                        "whose paper uses 6, and for factor_vae, whose paper's gamma on dSprites is 35)")
    p.add_argument("--teacher-tc-estimator", choices=("mws", "mss"), default="mws",
                   help="beta_tcvae: minibatch-weighted (mws) or minibatch-stratified (mss) sampling of log q(z)")
    p.add_argument("--teacher-tc-width", type=int, default=None,
                   help="factor_vae: units per layer of the TC discriminator (default the paper's 1,000; 256 trains "
                        "faster and keeps a resumable checkpoint at 9 MB instead of 64 MB)")
    p.add_argument("--teacher-warmup", type=int, default=0,
                   help="the teacher's beta (on the TC for beta_tcvae / factor_vae) ramps up from 0 over this many "
                        "steps (0 = off); factor_vae with gamma 35 collapses without it (docs/beta_vaegan.md)")
    p.add_argument("--warmup-teacher", action="store_true",
                   help=f"also train and score a teacher with beta warm-up over {WARMUP_STEPS} steps (not distilled)")
    p.add_argument("--student-warmup", type=int, default=0,
                   help="students: beta of L_vae ramps up from 0 over this many steps (0 = off)")
    p.add_argument("--added-logvar-init", type=float, default=None,
                   help="students: initial log-variance of the added dim's posterior (e.g. -6; default: layer init)")
    p.add_argument("--w-kd", type=float, default=STUDENT["w_kd"],
                   help=f"students: weight of L_KD (eq. 3; source 1, default {STUDENT['w_kd']:g}). A larger weight "
                        "pins the teacher's dims harder; cells with another weight are stored as separate stages")
    p.add_argument("--source-objective", action="store_true",
                   help="students: the loss exactly as the source's eqs. 1-5 (w_kd = w_adv = w_feature = 1, no pixel "
                        "BCE, no wrong-label D term); --student-set items still apply on top")
    p.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                   help="students: any BetaVAEGAN parameter (e.g. w_pixel=0), converted to its type; repeatable; "
                        "cells with other parameters are stored as separate stages")
    p.add_argument("--added-poses", choices=ADDED_POSES, default="fixed",
                   help="students: the coloured (added) images at the source's one scale and orientation (fixed), "
                        "or each (shape, position) at its own random scale and orientation (all), so that colour "
                        "is not told by the pose; cells with 'all' are stored as separate stages")
    p.add_argument("--no-check-pool", dest="check_pool", action="store_false")
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="skip the traversal and degree figures (correspondence.png, drawn from the table, is kept)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild results.md and correspondence.png from --out's results.jsonl (e.g. after merging "
                        "the rows of cells run in separate folders); nothing is trained")
    p.add_argument("--curves", nargs="+", type=Path, default=None, metavar="RUN",
                   help="only draw the teacher curves (quick FactorVAE score vs step, from --track) of these run "
                        "folders into --out/teacher_curves.png; nothing is trained")
    args = p.parse_args(argv)
    if args.report_only:  # the table and the correspondence figure from the stored rows; nothing trained
        res = open_store(args.out, KEY)
        if not res.rows():
            raise ParameterError(f"--report-only: no results in {args.out / 'results.jsonl'}")
        correspondence_figure(res, args.out / "correspondence.png")
        print(write_table(args.out, table_lines(res, args)))
        return
    if args.curves:
        print(teacher_curves_figure(args.curves, args.out / "teacher_curves.png"))
        return
    if args.paper:
        args.teacher_steps, args.student_steps, args.pool_size = PAPER_TEACHER_STEPS, PAPER_STUDENT_STEPS, 0
        args.device, args.track = "auto", True
    check_settings(args)
    res = open_store(args.out, KEY)
    teacher = teacher_stage(args, res)
    if args.teacher_only:
        print(teacher_summary(res.get(("teacher",))))
        return
    if args.warmup_teacher:
        warmup_teacher_stage(args, res)
    students = {g: student_stage(args, res, teacher, g, s) for g in args.gammas for s in args.seeds[:1]}
    for g in args.gammas:
        for s in args.seeds[1:]:
            student_stage(args, res, teacher, g, s)
    if args.figures:
        if 1.0 in students:
            traversal_figure(args, teacher, students[1.0])
        curves, normal = degree_stage(args, res, students)
        colour_probe_stage(args, res, students)
        degree_figures(curves, students, normal, args.out)
    if args.check_pool:
        pool_check_stage(args, res, teacher)
    correspondence_figure(res, args.out / "correspondence.png")  # from the table alone: always
    print(write_table(args.out, table_lines(res, args)))


# ---- table -----------------------------------------------------------------------------------------
def student_rows(res: ResultStore) -> dict[str, dict[tuple[float, int], dict]]:
    """Stored student rows grouped by setting (", w_kd=30" etc.; "" = the budget), budget first, then
    sorted by name; within a setting sorted by (gamma, seed)."""
    groups: dict[str, dict[tuple[float, int], dict]] = {}
    for r in res:
        if r.get("model") == "student":
            groups.setdefault(_describe(r.get("overrides", {})), {})[(r["gamma"], r["seed"])] = r
    return {k: dict(sorted(groups[k].items())) for k in sorted(groups, key=lambda k: (k != "", k))}


def _by_gamma(cells: dict[tuple[float, int], dict]) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for (gamma, _), r in cells.items():
        out.setdefault(gamma, []).append(r)
    return out


def colour_votes(row: dict) -> str:
    """Where the FactorVAE metric's colour votes went (all-6 metric): 'z1 224, z6 0 (831)' = the dimension
    with most colour votes, the added dimension's count, and the number of colour votes ('-' for a row
    stored without its votes)."""
    if "votes" not in row.get("metric6", {}):
        return "-"
    votes = np.asarray(row["metric6"]["votes"])[ColouredDSprites.factor_names.index("colour")]  # [factor][dim]
    top, added = int(votes.argmax()), len(votes) - 1
    text = f"z{top + 1} {votes[top]}" + ("" if top == added else f", z{added + 1} {votes[added]}")
    return f"{text} ({votes.sum()})"


def table_lines(res: ResultStore, args) -> list[str]:
    """results.md: the teacher(s), every stored student setting, the metric's notes, the degree curves."""
    body = []
    t = stored(res, "teacher")
    if t:
        src = SOURCE_TABLE1["teacher"]
        label = f"teacher ({t.get('objective', 'beta_vae')})"
        body.append([label, fmt(t["d_acc_5"]), "-", "-", "-", f"{fmt(src[0])} / - / -",
                     f"{t['steps']} x {t['batch_size']}",
                     "-" if t.get("train_cpu_s") is None else f"{t['train_cpu_s'] / 60:.1f}", t["seed"]])
    w = stored(res, "teacher_warmup")
    if w:
        body.append([f"teacher option: beta warm-up over {w['kl_warmup_steps']} steps", fmt(w["d_acc_5"]), "-", "-",
                     "-", "-", f"{w['steps']} x {w['batch_size']}", f"{w['train_cpu_s'] / 60:.1f}", w["seed"]])
    groups = student_rows(res)
    for setting, cells in groups.items():  # every stored setting: the budget's first
        for (gamma, seed), r in cells.items():
            src = SOURCE_TABLE1.get(gamma, (None, None, None))
            body.append([f"student gamma={gamma:g}{setting}", fmt(r["d_acc_5"]), fmt(r["d_acc_6"]),
                         fmt(r["correspondence"], ".2f"), colour_votes(r),
                         f"{fmt(src[0])} / {fmt(src[1])} / {fmt(src[2], '.2f')}",
                         f"{r['steps']} x {r['batch_size']}", f"{r['train_cpu_s'] / 60:.1f}", seed])
    lines = markdown_table(["model", "D-acc (5 original)", "D-acc (all 6)", "correspondence",
                            "colour votes: top dim, z6 (of all)", "source: 5 / 6 / corr.", "steps x batch",
                            "train CPU min", "seed"], body)
    summary = [[f"gamma={gamma:g}{setting}", *(mean_std(r[k] for r in rows) for k in ("d_acc_5", "d_acc_6")),
                mean_std((r["correspondence"] for r in rows), digits=2), len(rows),
                " / ".join(fmt(v, ".2f" if i == 2 else ".3f") for i, v in enumerate(SOURCE_TABLE1.get(gamma, ())))]
               for setting, cells in groups.items()
               for gamma, rows in _by_gamma(cells).items() if len(rows) > 1]
    if summary:
        lines += ["", "Mean ± std over the seeds stored (population std):", "",
                  *markdown_table(["student", "D-acc (5 original)", "D-acc (all 6)", "correspondence", "seeds",
                                   "source: 5 / 6 / corr."], summary)]
    pool = (f"votes drawn from a pool of {args.pool_size:,} encoded images (pooled votes)" if args.pool_size
            else "exact sampling")
    notes = [f"FactorVAE metric, disentanglement_lib variant: L = {METRIC['batch_size']}, {METRIC['num_train']:,} "
             f"training / {METRIC['num_eval']:,} eval votes, variances from {METRIC['num_variance_estimate']:,} "
             f"samples, prune std < 0.05; {pool}.",
             "D-acc (5 original): white sprites; D-acc (all 6): colour as a sixth factor (white + 5 levels); "
             f"correspondence: share of {CORRESPONDENCE_VOTES} colour votes naming the added dimension z6.",
             "CPU minutes are process CPU time on a shared 2-core machine with torch.set_num_threads(1)."]
    check = stored(res, "teacher_pool_check")
    if check:
        notes.append(f"Pooled vs exact sampling on the teacher (1,000 / 500 votes): {check['pooled_quick']:.3f} "
                     f"vs {check['exact_quick']:.3f}.")
    lines += ["", *(f"- {n}" for n in notes)]
    probes = sorted((r for r in res if r["stage"].startswith("colour_probe_g")), key=lambda r: r["stage"])
    if probes:
        prow = []
        for r in probes:
            for pose in ("all_poses", "added_pose"):
                share = r[pose]["colour_share"]
                prow.append([f"{r['gamma']:g}" + _describe(r.get("overrides", {})), pose.replace("_", " "),
                             *(f"{v:.2f}" for v in share)])
        dims = len(probes[0]["all_poses"]["colour_share"])
        lines += ["", "Colour probe (first seed): share of each dimension's variance that is colour (each of "
                  f"{probes[0]['all_poses']['n_sprites']} sprites rendered in all six colour levels; 1 = the dim "
                  "moves with colour only). \"all poses\": every factor drawn uniformly, as the metric draws "
                  "them; \"added pose\": at the scale and orientation of the coloured training images:", "",
                  *markdown_table(["gamma", "sprites", *(f"z{d + 1}" for d in range(dims))], prow)]
    deg = sorted((r for r in res if r["stage"].startswith("degree_g")), key=lambda r: r["stage"])
    if deg:
        curve_rows = []
        for r in deg:
            g = f"{r['gamma']:g}" + _describe(r.get("overrides", {}))
            curve_rows.append([f"{g} (AUROC)", *(f"{c['auroc_vs_reconstruction']:.3f}" for c in r["curve"])])
            curve_rows.append([f"{g} (redness)", *(f"{c['redness']:.2f}" for c in r["curve"])])
        lines += ["", *markdown_table(["gamma", *(f"z6={d:g}" for d in DEGREES)], curve_rows), "",
                  "AUROC of a PCA detector (32 components, fitted on 2,000 white sprites) separating "
                  f"{N_DEGREE_IMAGES} pseudo-anomalies at each degree from the student's unedited "
                  "reconstructions of the same sprites; redness = R - mean(G, B) on the input's sprite pixels "
                  "(white 0, red 1)."]
    return lines


# ---- figures ---------------------------------------------------------------------------------------
def traversal_figure(args, teacher: BetaVAE, student: BetaVAEGAN) -> Path:
    from anomalab.report.plots import image_grid

    values = np.linspace(-2.0, 2.0, 9)
    image = WhiteDSprites().images_from_factors(np.array([[2, 3, 0, 16, 16]]))  # a mid-size heart, centred
    zt, zs = teacher.encode(image)[0], student.encode(image)[0]
    rows = [(f"teacher z{d + 1}", teacher.traverse(d, values, zt)) for d in range(teacher.latent_dim)]
    rows += [(f"student z{d + 1}", student.traverse(d, values, zs)) for d in range(student.latent_dim)]
    # the added dim over the source's positive range ("anomalous feature present"), and over the range the
    # trained data occupy (user degree 0 .. 1: the white sprites' median code .. the strongest added level's)
    added = np.linspace(ADDED_RANGE[0], ADDED_RANGE[1], len(values))
    rows += [(f"student z{student.added_dim + 1} {added[0]:+g}..{added[-1]:+g}",
              student.traverse(student.added_dim, added, zs))]
    trained = ""
    if student.degree_range_ is not None:
        lo, hi = student.degree_range_
        rows += [(f"student z{student.added_dim + 1}, degree", student.traverse(student.added_dim,
                                                                             np.linspace(lo, hi, len(values)), zs))]
        trained = f"; last row: z{student.added_dim + 1} over its trained range {lo:+.2f} .. {hi:+.2f} (degree 0 .. 1)"
    return image_grid(rows, args.out / "traversal.png", col_titles=[f"{v:+.1f}" for v in values],
                      title=f"latent traversals: teacher (top) vs student gamma={student.gamma:g} (bottom)"
                      + (f", beta warm-up {student.kl_warmup_steps}" if student.kl_warmup_steps else "") + trained)


def degree_figures(curves: dict, students: dict[float, BetaVAEGAN], normal, out: Path) -> None:
    """degree_curve.png (AUROC and redness vs degree per gamma) and degree_samples*.png (8 sprites)."""
    from anomalab.report.plots import image_grid

    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.4))
    for gamma, rows in curves.items():
        d = [r["degree"] for r in rows]
        axes[0].plot(d, [r["auroc_vs_reconstruction"] for r in rows], marker="o", label=f"gamma={gamma:g}")
        axes[1].plot(d, [r["redness"] for r in rows], marker="o", label=f"gamma={gamma:g}")
    axes[0].set(xlabel="degree (value of the added dimension z6)", ylabel="AUROC (PCA detector)",
                title="pseudo-anomalies vs unedited reconstructions")
    axes[1].set(xlabel="degree (value of z6)", ylabel="redness of sprite pixels", title="colour of the output")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "degree_curve.png")
    for gamma, s in students.items():
        name = "degree_samples.png" if gamma == 1.0 else f"degree_samples_g{gamma:g}.png"
        image_grid([(f"z6={d:+.2f}", s.generate(normal[:8], d)) for d in DEGREES], out / name,
                   title=f"pseudo-anomalies of increasing degree (student gamma={gamma:g}) on 8 normal sprites")


def _teacher_label(run: Path) -> str:
    """'beta-VAE, beta 4' etc. from the run's teacher/model.json, or a model.json kept beside its results.jsonl
    (the folder name without either)."""
    meta = next((m for m in (run / "teacher" / "model.json", run / "model.json") if m.is_file()), None)
    if meta is None:
        return run.name
    params = json.loads(meta.read_text())["params"]
    name = {"beta_vae": "beta-VAE", "beta_tcvae": "beta-TCVAE", "factor_vae": "FactorVAE"}.get(
        params.get("objective", "beta_vae"), params.get("objective"))
    weight = "gamma" if params.get("objective") == "factor_vae" else "beta"
    extra = f", TC weight ramped over {params['kl_warmup_steps']:,} steps" if params.get("kl_warmup_steps") else ""
    extra += ", stratified TC estimator" if params.get("tc_estimator") == "mss" else ""
    return f"{name}, {weight} {params.get('beta'):g}{extra}"


def teacher_curves_figure(runs: list[Path], path: Path) -> Path:
    """Quick FactorVAE score (1,000 / 500 votes) against the teacher's step, one line per run folder (its
    results.jsonl `teacher_track_*` rows), the source's teacher (0.804) as a reference line."""
    fig, ax = pyplot().subplots(figsize=(8, 4.2))
    drawn = 0
    for run in runs:
        rows = []
        if (run / "results.jsonl").is_file():
            rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.strip()]
        track = sorted((r["step"], r["quick_factor_vae"]) for r in rows if str(r.get("stage", "")).startswith(
            "teacher_track_"))
        if not track:
            continue
        steps, scores = zip(*track, strict=True)
        ax.plot(steps, scores, marker=".", label=f"{_teacher_label(run)} ({run.name})")
        drawn += 1
    if not drawn:
        raise DataError(f"no teacher_track rows (from --track) in {', '.join(map(str, runs))}")
    ax.axhline(0.804, color="k", ls="--", lw=1, label="source's teacher (0.804)")
    ax.set(xlabel="teacher step (batches of 64)", ylabel="FactorVAE score (quick: 1,000 / 500 votes)",
           ylim=(0, 1), title="Teacher disentanglement on dSprites while training (latent 5)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def correspondence_figure(res: ResultStore, path: Path) -> Path | None:
    """Heatmap of the added-factor correspondence by gamma (columns) and student setting (rows), the
    source's Table 1 on top; D-acc (5) / D-acc (6) under each value. None when no student is stored."""
    groups = student_rows(res)  # a setting is only there with at least one row
    if not groups:
        return None
    gammas = sorted({g for cells in groups.values() for g, _ in cells})
    budget = f"w_kd={_value(STUDENT['w_kd'])}, w_adv={_value(STUDENT['w_adv'])}"
    labels = ["source (Table 1)"] + [k[2:] if k else budget for k in groups]
    grid = np.full((len(labels), len(gammas)), np.nan)
    text = [[""] * len(gammas) for _ in labels]
    for j, g in enumerate(gammas):
        src = SOURCE_TABLE1.get(g)
        if src:
            grid[0, j] = src[2]
            text[0][j] = f"{src[2]:.2f}\n{src[0]:.2f} / {src[1]:.2f}"
        for i, cells in enumerate(groups.values(), start=1):
            rows = [r for (gg, _), r in cells.items() if gg == g]
            if rows:  # first seed shown; others are listed in results.md
                r = rows[0]
                grid[i, j] = r["correspondence"]
                text[i][j] = f"{r['correspondence']:.2f}\n{r['d_acc_5']:.2f} / {r['d_acc_6']:.2f}"
    fig, ax = pyplot().subplots(figsize=(1.5 + 1.3 * len(gammas), 0.9 + 0.6 * len(labels)))
    ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i in range(len(labels)):
        for j in range(len(gammas)):
            ax.text(j, i, text[i][j] or "-", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(gammas)), [f"gamma={g:g}" for g in gammas])
    ax.set_yticks(range(len(labels)), labels)
    ax.axhline(0.5, color="black", lw=1.5)
    t = stored(res, "teacher")
    teacher = f"; teacher D-acc {t['d_acc_5']:.3f} (source {SOURCE_TABLE1['teacher'][0]:.3f})" if t else ""
    ax.set_title(f"added-factor correspondence (colour votes on z6)\nunder it: D-acc 5 original / all 6{teacher}",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
