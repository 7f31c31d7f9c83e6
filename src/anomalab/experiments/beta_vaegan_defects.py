"""beta-VAEGAN with a defect as the added factor, on a real texture photo: pseudo-defects of a chosen degree.

The source's stated next step after dSprites (Akita & Taguchi): the added factor is a defect on real images.
Normal images are windows of a scikit-image texture photo; the added images are windows of the same rows with
a synthetic defect (`anomalab.generate.defects`) blended in at graded strengths. Stages (each resumable:
finished rows in results.jsonl and saved models are skipped on a rerun):

1. teacher: a beta-VAE (latent 5, beta 4, the dSprites experiment's net) on gray windows of the photo's
   training rows (the rows `make_textures` trains on), rendered on demand;
2. student: beta-VAEGAN (latent 5 + 1) distilled from it, trained on clean windows (y = 0) and
   `N_ADDED` defective windows (y = 1, strengths `LEVELS`);
3. probe: does the added dimension measure the defect's strength? Its code on defective windows of the
   test rows (never seen) per strength, and the rank correlation of code and strength;
4. degree curve: for each user degree (0 = as the normal windows, 1 = the strongest trained level), the
   student's pseudo-defects of test windows against its unedited reconstructions of them, and the real
   synthetic defects of the same strength against the clean windows, scored by a detector fitted on clean
   training windows: AUROC vs degree;
5. results.md, degree_curve.png, samples.png.

Method and results: docs/beta_vaegan.md ("A defect as the added factor").
"""

from __future__ import annotations

import json

import numpy as np
import torch

from anomalab.data.textures import CATEGORIES, TexturePatches
from anomalab.errors import ParameterError
from anomalab.experiments._common import fmt, markdown_table, open_store, parser, pyplot, save_figure, write_table
from anomalab.experiments.beta_vaegan_dsprites import STUDENT, TEACHER, _train_chunks
from anomalab.generate.beta_vaegan import BetaVAE, BetaVAEGAN
from anomalab.generate.defects import DEFECTS
from anomalab.metrics import image_auroc
from anomalab.params import parse_items, validate
from anomalab.runs.store import ResultStore
from anomalab.types import ImageSet

LEVELS = (0.25, 0.5, 0.75, 1.0)  # strengths of the added (y = 1) images: image + level * (defect - image)
N_ADDED = 4000  # defective training windows (1,000 per level)
N_TEST = 400  # test windows per strength in the probe and the curve
N_DETECTOR = 2000  # clean training windows the detector is fitted on
DEGREES = (0.0, 0.25, 0.5, 0.75, 1.0)  # user degrees of the curve
SHOWN_DEGREES = (0.5, 1.0)  # degrees (and real strengths) drawn in samples.png
KEY = ("stage",)
# the defects' size: larger than the texture benchmark's (which are drawn for 128-256 px), so that at 64 px
# a full-strength defect is plain to a PCA detector (grass, intensity_shift: AUROC 0.56 / 0.73 / 0.95 at
# strengths 0.25 / 0.5 / 1 with these radii, 0.52 / 0.56 / 0.71 with the benchmark's)
DEFECT_OPTIONS = {"intensity_shift": {"radius": (40, 80)}, "blob": {"radius": (40, 80), "opacity": (0.7, 0.9)},
                  "scratch": {"width": (4, 8)}, "missing_patch": {"size": (50, 100)}}


def defective(windows: torch.Tensor, kind: str, levels: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Gray windows (N, 1, H, W) with a `kind` defect each (sized by DEFECT_OPTIONS), blended at strength
    levels[i] (as `anomalab make-defects --degree`: image + level * (full defect - image)), repeated to 3
    channels."""
    out = []
    for img, level in zip(windows.numpy(), levels, strict=True):
        full, _ = DEFECTS[kind](img.copy(), rng, **DEFECT_OPTIONS.get(kind, {}))
        out.append(img + float(level) * (np.asarray(full, dtype=np.float32) - img))
    return torch.from_numpy(np.clip(np.stack(out), 0, 1)).float().expand(-1, 3, -1, -1).contiguous()


def teacher_stage(args, res: ResultStore) -> BetaVAE:
    path = args.out / "teacher"
    data = TexturePatches(args.category, "train")
    if (path / "model.json").is_file():
        teacher = BetaVAE.load(path)
        teacher.data_ = data
    else:
        teacher = BetaVAE(**{**TEACHER, "steps": args.teacher_steps}, seed=args.seed)
        teacher.data_ = data
        teacher.start()
    teacher.progress = args.progress
    spent = _train_chunks(teacher, args.teacher_steps, path)
    if ("teacher",) not in res:
        test = TexturePatches(args.category, "test").sample(N_TEST, np.random.default_rng([args.seed, 1]))[0]
        rec = teacher.decode(teacher.encode(test))
        res.add({"stage": "teacher", "steps": teacher.steps_done_, "train_cpu_s": spent["cpu_s"],
                 "test_mae": float((rec - test).abs().mean())})
    return teacher


def student_stage(args, res: ResultStore, teacher: BetaVAE) -> BetaVAEGAN:
    path = args.out / f"student_g{args.gamma:g}"
    rng = np.random.default_rng([args.seed, 2])
    clean = TexturePatches(args.category, "train").sample(N_ADDED, rng)[0]
    levels = np.resize(np.asarray(LEVELS), N_ADDED)
    added = ImageSet(defective(clean, args.defect, levels, rng), meta={"levels": levels.tolist()})
    original = TexturePatches(args.category, "train", channels=3)
    if (path / "model.json").is_file():
        student = BetaVAEGAN.load(path)
        student.set_training_data(teacher, added, original)
    else:
        student = BetaVAEGAN(**{**STUDENT, "steps": args.student_steps, **args.overrides}, gamma=args.gamma,
                             seed=args.seed)
        student.fit(teacher, added, original, steps=0)
    student.progress = args.progress
    spent = _train_chunks(student, args.student_steps, path)
    if ("student",) not in res:
        res.add({"stage": "student", "gamma": args.gamma, "steps": student.steps_done_,
                 "train_cpu_s": spent["cpu_s"], "degree_range": list(student.degree_range_)})
    return student


def _test_sets(args) -> tuple[torch.Tensor, dict[float, torch.Tensor]]:
    """N_TEST clean test windows (3 channels) and, per strength, the same windows with a defect."""
    rng = np.random.default_rng([args.seed, 3])
    clean = TexturePatches(args.category, "test").sample(N_TEST, rng)[0]
    rgb = clean.expand(-1, 3, -1, -1).contiguous()
    # the same defects (one generator state per strength) at every strength; strength 0 = the clean windows
    bad = {0.0: rgb, **{lv: defective(clean, args.defect, np.full(N_TEST, lv), np.random.default_rng([args.seed, 4]))
                        for lv in LEVELS}}
    return rgb, bad


def probe_stage(args, res: ResultStore, student: BetaVAEGAN, clean: torch.Tensor, bad: dict) -> dict:
    """The added dimension's code on defective test windows per strength, and its rank correlation with it."""
    from scipy.stats import spearmanr

    if ("probe",) in res:
        return res.get(("probe",))
    codes = {lv: student.encode(x)[:, student.added_dim].numpy() for lv, x in bad.items()}
    strength = np.concatenate([np.full(len(c), lv) for lv, c in codes.items()])
    rho = spearmanr(strength, np.concatenate(list(codes.values()))).statistic
    return res.add({"stage": "probe", "defect": args.defect,
                    "code_median": {f"{lv:g}": float(np.median(c)) for lv, c in codes.items()},
                    "code_iqr": {f"{lv:g}": [float(np.quantile(c, 0.25)), float(np.quantile(c, 0.75))]
                                 for lv, c in codes.items()},
                    "spearman": float(rho), "n_per_level": N_TEST})


def curve_stage(args, res: ResultStore, student: BetaVAEGAN, clean: torch.Tensor, bad: dict) -> dict:
    """AUROC vs degree: pseudo-defects vs unedited reconstructions, real defects vs clean windows."""
    from anomalab.registry import create

    if ("curve",) in res:
        return res.get(("curve",))
    train = TexturePatches(args.category, "train", channels=3).sample(N_DETECTOR, np.random.default_rng([args.seed, 5]))
    detector = create(args.detector, seed=0).fit(train[0])
    labels = np.r_[np.zeros(N_TEST), np.ones(N_TEST)]
    clean_scores = detector.score(clean).numpy()
    recon = student.decode(student.encode(clean))
    recon_scores = detector.score(recon).numpy()
    rows = []
    for degree, level in zip(DEGREES, (0.0, *LEVELS), strict=True):
        fake = student.generate_degree(clean, degree)
        rows.append({"degree": degree, "code": student.degree_code(degree),
                     "pseudo_vs_reconstruction": image_auroc(labels, np.r_[recon_scores, detector.score(fake).numpy()]),
                     "real_vs_clean": image_auroc(labels, np.r_[clean_scores, detector.score(bad[level]).numpy()]),
                     "pseudo_change": float((fake - recon).abs().mean())})
    return res.add({"stage": "curve", "detector": args.detector, "n_detector": N_DETECTOR, "n_test": N_TEST,
                    "rows": rows})


def figures(args, student: BetaVAEGAN, clean: torch.Tensor, bad: dict, curve: dict) -> None:
    from anomalab.report.plots import image_grid

    show = clean[:6]
    teacher = student.teacher_
    rows = [("test window", show),
            ("teacher recon.", teacher.decode(teacher.encode(show[:, :1])).expand(-1, 3, -1, -1)),
            ("student recon.", student.decode(student.encode(show)))]
    rows += [(f"degree {d:g}", student.generate_degree(show, d)) for d in SHOWN_DEGREES]
    rows += [(f"real, strength {lv:g}", bad[lv][: len(show)]) for lv in SHOWN_DEGREES]
    image_grid(rows, args.out / "samples.png",
               title=f"{args.category}: beta-VAEGAN pseudo-defects ({args.defect}) by degree, and real synthetic "
                     "defects of the same strengths")
    fig, ax = pyplot().subplots(figsize=(5.2, 3.6))
    d = [r["degree"] for r in curve["rows"]]
    ax.plot(d, [r["pseudo_vs_reconstruction"] for r in curve["rows"]], marker="o",
            label="pseudo-defects vs reconstructions")
    ax.plot(d, [r["real_vs_clean"] for r in curve["rows"]], marker="s", label="real defects vs clean windows")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="degree (pseudo) / strength (real)", ylabel=f"AUROC ({curve['detector']})", ylim=(0.3, 1.02),
           title=f"{args.category}, {args.defect}: AUROC vs degree")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    save_figure(fig, args.out / "degree_curve.png")


def table_lines(res: ResultStore, args) -> list[str]:
    t, s, p, c = (res.get((k,)) for k in ("teacher", "student", "probe", "curve"))
    lines = [f"Texture `{args.category}`, defect `{args.defect}`, strengths {', '.join(f'{v:g}' for v in LEVELS)}; "
             f"teacher {t['steps']} steps ({t['train_cpu_s'] / 60:.1f} CPU min, test mean |x - x^| "
             f"{t['test_mae']:.3f}); student gamma={s['gamma']:g}"
             f"{''.join(f', {k}={v}' for k, v in sorted(args.overrides.items()))}, {s['steps']} steps "
             f"({s['train_cpu_s'] / 60:.1f} CPU min), degree range of the added dim "
             f"{s['degree_range'][0]:.2f} .. {s['degree_range'][1]:.2f}.", ""]
    if p:
        lines += ["Added dimension's code on defective test windows (median [IQR]) by strength; Spearman "
                  f"rho(code, strength) = {p['spearman']:.3f} over {p['n_per_level']} windows per strength:", ""]
        lines += markdown_table(["strength", *p["code_median"]],
                                [["code", *(f"{p['code_median'][k]:.2f} [{v[0]:.2f}, {v[1]:.2f}]"
                                            for k, v in p["code_iqr"].items())]]) + [""]
    if c:
        lines += markdown_table(["degree", "code", "AUROC pseudo vs reconstruction", "AUROC real vs clean",
                                 "mean |pseudo - reconstruction|"],
                                [[f"{r['degree']:g}", f"{r['code']:.2f}", fmt(r["pseudo_vs_reconstruction"]),
                                  fmt(r["real_vs_clean"]), f"{r['pseudo_change']:.4f}"] for r in c["rows"]])
        lines += ["", f"Detector: `{c['detector']}` fitted on {c['n_detector']:,} clean training windows; "
                  f"{c['n_test']} test windows (the photo's rows below the training rows) per cell."]
    return lines


SETTINGS_FILE = "settings.json"


def check_settings(args) -> None:
    """An --out folder holds one run: its settings are written on the first run, and a rerun with others is
    refused (its rows and models would be mistaken for theirs)."""
    wanted = {k: getattr(args, k) for k in ("category", "defect", "gamma", "seed", "teacher_steps", "student_steps",
                                            "detector", "overrides")}
    f = args.out / SETTINGS_FILE
    if f.is_file():
        found = json.loads(f.read_text())
        if found != wanted:
            diff = ", ".join(f"{k} {found.get(k)!r} (asked {v!r})" for k, v in wanted.items() if found.get(k) != v)
            raise ParameterError(f"{args.out} holds a run with other settings: {diff}; choose another --out")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(wanted, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = parser("beta_vaegan_defects", __doc__)
    p.add_argument("--category", default="grass", choices=CATEGORIES)
    p.add_argument("--defect", default="intensity_shift", choices=sorted(DEFECTS))
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--student-steps", type=int, default=3000)
    p.add_argument("--detector", default="pca", help="registry name of the detector behind the AUROC curve")
    p.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                   help="students: any BetaVAEGAN parameter over the dSprites experiment's budget (e.g. w_adv=1), "
                        "converted to its type; repeatable")
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args(argv)
    if args.teacher_steps < 1 or args.student_steps < 1:
        raise ParameterError("--teacher-steps and --student-steps must be at least 1")
    args.overrides = validate(BetaVAEGAN, parse_items(args.student_set, what="--student-set"),
                              owner="beta_vaegan student")
    check_settings(args)
    res = open_store(args.out, KEY)
    teacher = teacher_stage(args, res)
    student = student_stage(args, res, teacher)
    clean, bad = _test_sets(args)
    probe_stage(args, res, student, clean, bad)
    curve = curve_stage(args, res, student, clean, bad)
    figures(args, student, clean, bad, curve)
    print(write_table(args.out, table_lines(res, args)))
