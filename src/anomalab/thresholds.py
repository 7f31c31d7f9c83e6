"""Thresholds a person can check and change: the normal scores a run's threshold rests on (kept in the run's
`calibration.json`), cross-fitting so that every image of a small training set gives a calibration score,
checks of how far those scores can be trusted, and re-picking a run's thresholds without refitting
(`retune`, the `anomalab threshold` command).

Rules:

- Image threshold: the (1 - max_fpr) quantile ("higher") of the normal scores (`Threshold.fit`).
- Pixel threshold: the same quantile of each normal image's hottest map pixel, so that about max_fpr of
  normal images show any defect-mask pixel (map > pixel threshold) and the rest an empty mask. The median of
  the normal maps' pixels ("level") is kept too: the low end of the overlays' colour scale.
- Cross-fitting (`folds` >= 2): the training images are split into k folds; k detectors, each fitted on
  k - 1 folds, score the fold they did not see, so every training image has one out-of-fold score.
  Near-duplicate images (below) are kept in one fold, so no image is scored by a detector that trained on
  its twin. The saved detector is then fitted on all training images; it saw more data than the fold
  detectors, so the threshold errs on the high side (fewer false alarms). Automatic (`folds=None`) for the
  detectors that are cheap to fit (`CHEAP_TO_FIT`) on fewer than `AUTO_BELOW` training images, with
  min(5, n) folds; otherwise a share of the training images is held out (`calib_frac`).
- Support: n normal scores cannot support a false-positive rate below about 1/n. With max_fpr < 1/n the
  threshold is simply their highest score, and about 1 in n + 1 new normal images scores above it; a
  warning says so. The one-sided 95 % Clopper-Pearson bound on the true rate is recorded.
- Near-duplicates (`DupSpace`): two images are near-duplicates when their RMS difference is below
  `DUP_TOLERANCE` (0.1) of what two unrelated training images differ by (sqrt(2) x the training images'
  per-pixel standard deviation). They are compared as 32 x 32 gray pixels in place, or, for detectors that
  ignore where things are (`SHIFT_INVARIANT`: gaussian, patchcore, metric; knn on an embedding), as 64 x 64
  gray pixels at the best relative shift with at least half of the area in common, so that an overlapping
  crop or a panned video frame counts too. A calibration image with a near-duplicate among the images its
  detector trained on scores like a training image, so the threshold comes out too low; a warning gives
  the fraction when it reaches `DUP_WARN_FRACTION` (10 %). Cross-fitting keeps near-duplicate groups in one
  fold unless they chain through the set (then it warns the same way). Large sets are checked on an even
  spread of at most MAX_DUP_QUERIES (in place) or MAX_SHIFT_QUERIES against MAX_SHIFT_REFS (shifted) images.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from anomalab.errors import DataError, ParameterError, RunFolderError, UserError
from anomalab.types import ImageSet, Threshold, _clean

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = 1
CHEAP_TO_FIT = ("knn", "pca", "gaussian", "patchcore", "padim")
AUTO_BELOW = 200  # automatic cross-fitting below this many training images
AUTO_FOLDS = 5
DUP_SIZE = 32  # side of the gray images compared in place
SHIFT_SIZE = 64  # side of the gray images compared at the best shift
MIN_OVERLAP = 0.5  # least share of the area two shifted images have in common
DUP_TOLERANCE = 0.1  # near-duplicate: ratio below this (see DupSpace)
DUP_WARN_FRACTION = 0.1  # warn when this share of the calibration images are near-duplicates
SHIFT_INVARIANT = ("gaussian", "patchcore", "metric")  # detectors compared at the best shift
MAX_GROUPED = 5000  # in place: above this many training images, folds are drawn at random (no grouping)
MAX_SHIFT_GROUPED = 300  # the same, shifted
MAX_DUP_QUERIES = 2000  # calibration images checked, in place (an even spread over them)
MAX_SHIFT_QUERIES = 100  # calibration images checked, shifted
MAX_SHIFT_REFS = 500  # training images they are compared with, shifted (in place: all)
MAP_BATCH = 32  # images per score_map call
PIXELS_PER_IMAGE = 1024  # map pixels per image kept for the level and quantiles
LISTED = 20  # file names listed in a record

HOLDOUT_HINT = ("cross-fitting (`anomalab fit ... --calib-folds 5`) keeps near-duplicates in one fold; or give "
                "normal images taken apart from the training ones (other parts, another day) with "
                "`anomalab threshold RUN --normal DIR`")


def now() -> str:
    """The current time, ISO 8601 in UTC, as recorded with a threshold."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---- how the threshold is calibrated ------------------------------------------------------------------
def check_folds(calib_folds: Any) -> int | None:
    """None (automatic), 0 (hold out a share instead) or an integer >= 2; a ParameterError otherwise."""
    if calib_folds is None:
        return None
    if isinstance(calib_folds, bool) or not isinstance(calib_folds, int) or calib_folds < 0 or calib_folds == 1:
        raise ParameterError(f"--calib-folds must be 0 (hold out --calib-frac instead) or an integer >= 2, "
                             f"got {calib_folds!r}")
    return calib_folds


def choose_folds(detector: str, n_train: int, calib_folds: int | None) -> int:
    """The number of cross-fitting folds (0: hold-out). calib_folds None: min(AUTO_FOLDS, n) for a detector
    cheap to fit (CHEAP_TO_FIT) on fewer than AUTO_BELOW images, else 0."""
    k = check_folds(calib_folds)
    if k is None:
        return min(AUTO_FOLDS, n_train) if detector in CHEAP_TO_FIT and 2 <= n_train < AUTO_BELOW else 0
    if k > n_train:
        raise ParameterError(f"--calib-folds {k} is more than the {n_train} training images")
    return k


# ---- scores and map statistics of normal images ------------------------------------------------------
@dataclass
class NormalStats:
    """What normal images the detector did not train on look like to it: their scores, each image's hottest
    map pixel (None without maps) and a fixed sample of map pixels (for the level and quantiles)."""

    scores: np.ndarray
    names: list[str]
    map_max: np.ndarray | None = None
    map_sample: np.ndarray | None = None
    fold: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def map_level(self) -> float | None:
        return None if self.map_sample is None else float(np.median(self.map_sample))

    def map_summary(self) -> dict[str, Any] | None:
        if self.map_max is None or self.map_sample is None:
            return None
        q = {str(p): float(np.quantile(self.map_sample, p)) for p in (0.5, 0.9, 0.99, 0.999)}
        return {"level": self.map_level(), "pixel_quantiles": q,
                "statistic": "per-image maximum of the anomaly map (map_max)"}


def _map_stats(maps: Tensor) -> tuple[np.ndarray, np.ndarray]:
    flat = maps.detach().cpu().double().reshape(len(maps), -1)
    pick = np.unique(np.linspace(0, flat.shape[1] - 1, min(PIXELS_PER_IMAGE, flat.shape[1])).round().astype(int))
    return flat.max(1).values.numpy(), flat[:, torch.as_tensor(pick)].reshape(-1).numpy()


def normal_statistics(det: Any, images: Tensor, names: Sequence[str] | None = None, *,
                      maps: bool = True) -> NormalStats:
    """Scores (`det.score`, as `fit_threshold` always did) and, with maps=True where the detector has them,
    per-image map maxima and a pixel sample of normal `images`."""
    scores = det.score(images).detach().cpu().double().numpy()
    names = list(names) if names is not None else [f"image/{i}" for i in range(len(scores))]
    stats = NormalStats(scores=scores, names=names)
    if not maps or not len(images):
        return stats
    maxima, samples = [], []
    try:
        for i in range(0, len(images), MAP_BATCH):
            m, s = _map_stats(det.score_map(images[i : i + MAP_BATCH]))
            maxima.append(m)
            samples.append(s)
    except (NotImplementedError, ParameterError):
        return stats
    stats.map_max, stats.map_sample = np.concatenate(maxima), np.concatenate(samples)
    if not (np.all(np.isfinite(stats.map_max)) and np.all(np.isfinite(stats.map_sample))):
        log.warning("%s: anomaly maps of normal images hold NaN or infinite values; no pixel threshold",
                    getattr(det, "name", type(det).__name__))
        stats.map_max = stats.map_sample = None
    return stats


def gives_maps(det: Any) -> bool:
    """Whether the fitted detector gives anomaly maps (tried on one blank image)."""
    shape = tuple(int(s) for s in det.input_shape_)
    try:
        det.score_map(torch.zeros((1, *shape)))
    except (NotImplementedError, ParameterError):
        return False
    return True


def threshold_from(stats: NormalStats, max_fpr: float, *, basis: str = "normal") -> Threshold:
    """The image threshold at max_fpr from the normal scores, with the pixel threshold at the same rate from
    the per-image map maxima where there are maps."""
    pixel = None if stats.map_max is None else Threshold.fit(stats.map_max, max_fpr).value
    return Threshold.fit(stats.scores, max_fpr, basis=basis, pixel_value=pixel, created=now())


# ---- how far n scores can be trusted -------------------------------------------------------------------
def fpr_upper_bound(n_above: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a false-positive rate seen as n_above of n."""
    if n_above >= n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, n_above + 1, n - n_above))


def support_warning(n: int, max_fpr: float, basis: str = "holdout") -> str | None:
    """The warning for a threshold at max_fpr that rests on n normal scores, or None when they support it
    (max_fpr >= 1/n: at least about one of them lies above the threshold)."""
    if n >= 1 and max_fpr * n >= 1:
        return None
    n = max(n, 1)
    more = ("`anomalab threshold RUN --normal DIR` scores other normal images" if basis in ("crossfit", "normal")
            else "`--calib-folds 5` cross-fitting scores every training image, `anomalab threshold RUN --normal "
                 "DIR` other normal images")
    return (f"the threshold rests on {n} normal scores, too few for a false-positive rate of {max_fpr:g}: the "
            f"smallest rate {n} scores can support is about 1/{n} = {1 / n:.2g}. The threshold is then the highest "
            f"of their scores; about 1 in {n + 1} new normal images can be expected above it, and the true rate "
            f"may be as high as {100 * fpr_upper_bound(0, n):.0f} % (95 % bound). Give more normal images ({more}) "
            f"or ask for a rate of at least {1 / n:.2g}")


def support(scores: np.ndarray, thr: Threshold) -> dict[str, Any]:
    """How many normal scores the threshold rests on and what they say about its false-positive rate."""
    n = len(scores)
    above = int(np.sum(np.asarray(scores) > thr.value)) if n else 0
    record: dict[str, Any] = {"n": n, "min_supported_fpr": 1 / n if n else None, "n_above": above,
                              "fpr_on_normals": above / n if n else None,
                              "fpr_upper_95": fpr_upper_bound(above, n) if n else None, "warning": None}
    if thr.method == "quantile":
        record["max_fpr"] = thr.max_fpr
        record["warning"] = support_warning(n, thr.max_fpr, thr.basis)
    return record


# ---- near-duplicates -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DupSpace:
    """How images are compared for near-duplicates (module docstring): as `size` x `size` gray pixels, in
    place (`shifted` False), or at the best relative shift with at least MIN_OVERLAP of the area in common
    (`shifted` True: for detectors that ignore where things are, which see an overlapping crop or a panned
    video frame as the same image). ratio(a, b) = RMS difference (on the overlap) / (sqrt(2) x the training
    images' per-pixel standard deviation): about 1 for two unrelated normal images, 0 for copies."""

    shifted: bool = False

    @property
    def size(self) -> int:
        return SHIFT_SIZE if self.shifted else DUP_SIZE

    @property
    def max_queries(self) -> int:
        return MAX_SHIFT_QUERIES if self.shifted else MAX_DUP_QUERIES

    @property
    def max_refs(self) -> int | None:
        return MAX_SHIFT_REFS if self.shifted else None

    @property
    def max_grouped(self) -> int:
        return MAX_SHIFT_GROUPED if self.shifted else MAX_GROUPED

    def describe(self) -> str:
        if self.shifted:
            return (f"pixels, {self.size}x{self.size} gray, at the best shift with at least {MIN_OVERLAP:.0%} overlap "
                    "(the detector ignores where things are)")
        return f"pixels, {self.size}x{self.size} gray, in place"

    def features(self, images: Tensor) -> Tensor:
        """(N, size, size) float32 gray images."""
        from anomalab.data.transforms import prepare

        if not len(images):
            return torch.empty((0, self.size, self.size))
        return torch.cat([prepare(images[i : i + 256], (1, self.size, self.size))[:, 0]
                          for i in range(0, len(images), 256)])

    @staticmethod
    def variance(ref: Tensor) -> float:
        """The training images' per-pixel variance (mean over pixels), at least that of one gray level."""
        v = float(ref.double().var(0).mean()) if len(ref) > 1 else 0.0
        return max(v, (1 / 255) ** 2)

    def block(self, query: Tensor, ref: Tensor, variance: float) -> Tensor:
        """(len(query), len(ref)) ratios."""
        if not self.shifted:
            msd = torch.cdist(query.flatten(1).double(), ref.flatten(1).double()).pow(2) / query[0].numel()
        else:
            msd = torch.stack([self._shifted_msd(q, ref) for q in query]) if len(query) else ref.new_empty(0, len(ref))
        return (msd.clamp_min(0) / (2 * variance)).sqrt().float()

    def _shifted_msd(self, q: Tensor, ref: Tensor, chunk: int = 128) -> Tensor:
        s = self.size
        pad = (2 * s, 2 * s)

        def f(x: Tensor) -> Tensor:
            return torch.fft.rfft2(x, s=pad)

        ones = torch.ones((s, s))
        f1 = f(ones)
        area = torch.fft.irfft2(torch.conj(f1) * f1, s=pad).round()
        valid = area >= MIN_OVERLAP * s * s
        q2 = torch.fft.irfft2(torch.conj(f(q * q)) * f1, s=pad)  # sum of q^2 over the overlap, per shift
        fq = torch.conj(f(q))
        out = []
        for i in range(0, len(ref), chunk):
            r = ref[i : i + chunk]
            r2 = torch.fft.irfft2(torch.conj(f1) * f(r * r), s=pad)
            qr = torch.fft.irfft2(fq * f(r), s=pad)
            msd = ((q2 + r2 - 2 * qr) / area.clamp_min(1)).masked_fill(~valid, float("inf"))
            out.append(msd.flatten(1).min(1).values.double())
        return torch.cat(out)

    def matrix(self, images: Tensor, variance: float) -> Tensor:
        """(n, n) ratios of the images to each other, built a block of rows at a time."""
        chunk = max(1, min(256, 2**22 // max(1, len(images))))
        return torch.cat([self.block(images[i : i + chunk], images, variance) for i in range(0, len(images), chunk)])

    def nearest(self, query: Tensor, ref: Tensor, variance: float, *, exclude: np.ndarray | None = None,
                query_group: np.ndarray | None = None) -> np.ndarray:
        """Ratio from each query image to its nearest ref image; with `exclude` (a label per ref image) and
        `query_group` (per query), ref images of the query's own label (its own fold) are left out."""
        chunk, out = max(1, min(256, 2**22 // max(1, len(ref)))), []
        for i in range(0, len(query), chunk):
            d = self.block(query[i : i + chunk], ref, variance)
            if exclude is not None:
                same = torch.as_tensor(query_group[i : i + chunk][:, None] == exclude[None, :])
                d = d.masked_fill(same, float("inf"))
            out.append(d.min(1).values.numpy())
        return np.concatenate(out) if out else np.empty(0)


def dup_space(det: Any) -> DupSpace:
    """The comparison for `det`: shift-tolerant for detectors that ignore where things are (SHIFT_INVARIANT,
    and knn on an embedding), in place for the others."""
    name = getattr(det, "name", "")
    return DupSpace(shifted=name in SHIFT_INVARIANT or (name == "knn" and bool(getattr(det, "embedder", None))))


def _spread_pick(n: int, most: int | None) -> np.ndarray:
    """Indices of at most `most` of n items, evenly spread (all of them for most None)."""
    if most is None or n <= most:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, most).round().astype(int))


def duplicate_groups(ratios: Tensor) -> np.ndarray:
    """Group id per image from an (n, n) ratio matrix: images linked by near-duplicate pairs share one."""
    n = len(ratios)
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows, cols = torch.nonzero(ratios < DUP_TOLERANCE, as_tuple=True)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        if r != c:
            a, b = root(r), root(c)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(n)])


def _group_counts(sizes: np.ndarray) -> dict[str, int]:
    """How many images sit in near-duplicate groups, how many such groups, the largest, from the group sizes."""
    return {"n_grouped_images": int(sizes[sizes > 1].sum()), "n_groups": int(np.sum(sizes > 1)),
            "largest_group": int(sizes.max())}


def make_folds(ratios: Tensor | None, n: int, k: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(fold index per image, description): k folds of about equal size with near-duplicate groups kept
    whole (largest groups first, each into the smallest fold so far), from the (n, n) ratio matrix. Random
    folds without it, or when the groups cannot be balanced (fewer groups than folds, or one group larger
    than 1.5 n / k: near-duplicates chained through the set)."""
    rng = np.random.default_rng(seed)
    info: dict[str, Any] = {"k": k, "seed": seed, "grouped": False, "n_grouped_images": None, "n_groups": None,
                            "largest_group": None}
    if ratios is not None:
        ids, inverse, sizes = np.unique(duplicate_groups(ratios), return_inverse=True, return_counts=True)
        info.update(_group_counts(sizes))
        if len(ids) >= k and sizes.max() <= 1.5 * n / k:
            order = rng.permutation(len(ids))
            order = order[np.argsort(-sizes[order], kind="stable")]
            fold_of, counts = np.empty(len(ids), dtype=int), np.zeros(k, dtype=int)
            for g in order:
                f = int(np.argmin(counts))
                fold_of[g], counts[f] = f, counts[f] + sizes[g]
            info["grouped"] = True
            return fold_of[inverse], info
    fold = np.empty(n, dtype=int)
    fold[rng.permutation(n)] = np.arange(n) % k
    return fold, info


def duplicate_record(ratio: np.ndarray, names: Sequence[str], n_calibration: int, space: DupSpace,
                     n_reference: int) -> dict[str, Any]:
    """The near-duplicate check of calibration images: ratio to the nearest image their detector trained on."""
    flagged = ratio < DUP_TOLERANCE
    n = len(ratio)
    return {"checked": True, "space": space.describe(), "tolerance": DUP_TOLERANCE,
            "n_calibration": n_calibration, "n_checked": n, "n_reference": n_reference,
            "n_near_duplicates": int(flagged.sum()), "fraction": float(flagged.mean()) if n else 0.0,
            "median_ratio": float(np.median(ratio)) if n else None,
            "examples": [names[i] for i in np.flatnonzero(flagged)[:LISTED]]}


def duplicate_warning(record: dict[str, Any] | None, hint: str = HOLDOUT_HINT) -> str | None:
    """The warning for a near-duplicate record whose fraction reaches DUP_WARN_FRACTION, else None."""
    if not record or not record.get("checked") or record["fraction"] < DUP_WARN_FRACTION:
        return None
    shown = ", ".join(Path(n).name for n in record["examples"][:3])
    return (f"{record['n_near_duplicates']} of {record['n_checked']} calibration images "
            f"({100 * record['fraction']:.0f} %) are near-duplicates of training images (e.g. {shown}): they score "
            "like training images, so the threshold is too low and new normal images will be flagged; " + hint)


def holdout_duplicates(calib: Tensor, train: Tensor, names: Sequence[str], space: DupSpace) -> dict[str, Any]:
    """Near-duplicate check of held-out (or given) normal images against the training images."""
    ref = space.features(train[torch.as_tensor(_spread_pick(len(train), space.max_refs))])
    pick = _spread_pick(len(calib), space.max_queries)
    query = space.features(calib[torch.as_tensor(pick)])
    ratio = space.nearest(query, ref, space.variance(ref))
    return duplicate_record(ratio, [names[i] for i in pick], len(calib), space, len(ref))


# ---- calibration of a fit --------------------------------------------------------------------------------
def _duplicate_ratios(train: ImageSet, space: DupSpace) -> tuple[Tensor, float, Tensor | None]:
    """The training images in `space`, their variance, and the (n, n) near-duplicate ratio matrix (None above
    `space.max_grouped` images)."""
    features = space.features(train.images)
    variance = space.variance(features)
    return features, variance, space.matrix(features, variance) if len(train) <= space.max_grouped else None


def cross_fit(make: Callable[[], Any], train: ImageSet, k: int, seed: int, *, maps: bool = True,
              space: DupSpace | None = None) -> tuple[NormalStats, dict[str, Any], dict[str, Any]]:
    """Out-of-fold statistics of every training image: (stats in training order, fold description,
    near-duplicate record of each image against the images its fold detector trained on)."""
    space = space or DupSpace()
    n = len(train)
    features, variance, ratios = _duplicate_ratios(train, space)
    fold, info = make_folds(ratios, n, k, seed)
    scores, map_max, samples = np.empty(n), np.empty(n), [None] * k
    for f in range(k):
        held, fit_idx = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        fold_det = make()
        try:
            fold_det.fit(train.subset(fit_idx))
        except ParameterError as e:
            raise ParameterError(f"cross-fitting fold {f + 1}/{k} trains on {len(fit_idx)} images: {e}; pass "
                                 "--calib-folds 0 to hold out --calib-frac of the images instead") from None
        st = normal_statistics(fold_det, train.images[torch.as_tensor(held)], maps=maps)
        scores[held] = st.scores
        if st.map_max is None:
            maps = False
        else:
            map_max[held], samples[f] = st.map_max, st.map_sample
        log.info("cross-fitting: fold %d/%d (%d images held out)", f + 1, k, len(held))
    stats = NormalStats(scores=scores, names=list(train.names), fold=fold)
    if maps:
        stats.map_max, stats.map_sample = map_max, np.concatenate(samples)
    return stats, info, _fold_duplicates(train, fold, features, variance, ratios, space)


def _fold_duplicates(train: ImageSet, fold: np.ndarray, features: Tensor, variance: float, ratios: Tensor | None,
                     space: DupSpace) -> dict[str, Any]:
    """The near-duplicate record of out-of-fold scoring: each image against the images its fold's detector
    trained on (every other fold)."""
    n = len(train)
    if ratios is not None:
        ratio = ratios.masked_fill(torch.as_tensor(fold[:, None] == fold[None, :]), float("inf")).min(1).values
        pick, ratio, n_ref = np.arange(n), ratio.numpy(), n
    else:
        pick, refs = _spread_pick(n, space.max_queries), _spread_pick(n, space.max_refs)
        ratio = space.nearest(features[torch.as_tensor(pick)], features[torch.as_tensor(refs)], variance,
                              exclude=fold[refs], query_group=fold[pick])
        n_ref = len(refs)
    return duplicate_record(ratio, [train.names[i] for i in pick], n, space, n_ref)


def leave_group_out(det: Any, train: ImageSet, *, space: DupSpace | None = None
                    ) -> tuple[NormalStats, dict[str, Any], dict[str, Any]]:
    """Like `cross_fit`, for a detector that scores its training images as if each had been left out, in closed
    form (`det.heldout_maps(images, groups)`, e.g. PaDiM): every near-duplicate group is its own fold, so each
    image is scored by a model fitted on all the others (n - 1 images, not (k - 1) / k of them)."""
    space = space or DupSpace()
    n = len(train)
    features, variance, ratios = _duplicate_ratios(train, space)
    fold = np.arange(n) if ratios is None else np.unique(duplicate_groups(ratios), return_inverse=True)[1]
    sizes = np.bincount(fold)
    scores, maps = det.heldout_maps(train.images, fold)
    stats = NormalStats(scores=scores.double().numpy(), names=list(train.names), fold=fold)
    maxima, samples = zip(*(_map_stats(maps[i : i + MAP_BATCH]) for i in range(0, n, MAP_BATCH)), strict=True)
    stats.map_max, stats.map_sample = np.concatenate(maxima), np.concatenate(samples)
    info = {"k": int(len(sizes)), "seed": None, "method": "leave-one-out", "grouped": ratios is not None,
            **_group_counts(sizes)}
    log.info("leave-one-out scores of %d training images (closed form, %d near-duplicate groups left out whole)",
             n, info["n_groups"])
    return stats, info, _fold_duplicates(train, fold, features, variance, ratios, space)


def describe(thr: Threshold, folds: int | dict[str, Any] | None = None) -> str:
    """One line: how the threshold was set and on how many normal scores it rests."""
    loo = isinstance(folds, dict) and folds.get("method") == "leave-one-out"
    if isinstance(folds, dict):
        folds = folds.get("k")
    where = {"holdout": "held-out training images",
             "crossfit": "training images, each left out of the model that scored it (leave-one-out, closed "
                         "form)" if loo else f"out-of-fold training images ({folds}-fold cross-fitting)" if folds else
                         "out-of-fold training images (cross-fitting)",
             "train": "training images themselves (no held-out share: optimistic)",
             "normal": "normal images given for it", "none": "no kept normal images"}[thr.basis]
    if thr.method == "value":
        return (f"set by hand to {thr.value:.6g}" + (f"; {thr.max_fpr:.3g} of the {thr.n_normal} normal scores of "
                                                     f"the {where} lie above it" if thr.n_normal else ""))
    return (f"the {1 - thr.max_fpr:.4g} quantile (max FPR {thr.max_fpr:g}) of {thr.n_normal} normal scores of the "
            f"{where}")


def _warnings(sup: dict[str, Any], dup: dict[str, Any] | None, basis: str, hint: str = HOLDOUT_HINT) -> list[str]:
    out = [w for w in (sup.get("warning"), duplicate_warning(dup, hint)) if w]
    if basis == "train":
        out.append("the threshold rests on the training images' own scores (--calib-frac 0): they score lower "
                   "than unseen normal images, so the threshold is too low; use cross-fitting (--calib-folds 5) "
                   "or a held-out share")
    return out


PIXEL_RULES = {"quantile": "the {q:.4g} quantile of the per-image map maxima of the same normal images",
               "value": "set by hand", "kept": "kept from the previous threshold"}


def build_record(stats: NormalStats, thr: Threshold, *, dup: dict[str, Any] | None, n_train: int | None,
                 folds: dict[str, Any] | None = None, history: list | None = None,
                 source: dict[str, Any] | None = None, pixel: str = "quantile") -> dict[str, Any]:
    """The calibration.json record: the normal scores (top-level `scores`, with `names`), map statistics,
    the threshold and how it was set, what the scores support, the near-duplicate check, the warnings."""
    sup = support(stats.scores, thr)
    hint = HOLDOUT_HINT if thr.basis != "crossfit" else (
        "the near-duplicates are chained across folds (a video, overlapping crops of one picture): give normal "
        "images taken apart from the training ones with `anomalab threshold RUN --normal DIR`")
    return _clean({
        "format": CALIBRATION_FORMAT, "basis": thr.basis, "n_train": n_train, "folds": folds,
        "source": source,
        "names": list(stats.names), "scores": stats.scores, "fold": stats.fold, "map_max": stats.map_max,
        "maps": stats.map_summary(),
        "threshold": thr.to_dict(), "how": describe(thr, folds or None),
        "pixel": None if thr.pixel_value is None else {
            "value": thr.pixel_value, "method": pixel, "rule": PIXEL_RULES[pixel].format(q=1 - thr.max_fpr)},
        "support": sup, "near_duplicates": dup, "warnings": _warnings(sup, dup, thr.basis, hint),
        "history": list(history or []),
    })


def calibrate(det: Any, fit_set: ImageSet, calib: ImageSet | None, *, max_fpr: float, folds: int = 0,
              make: Callable[[], Any] | None = None, seed: int = 0, leave_one_out: bool = False) -> dict[str, Any]:
    """Set the thresholds of `det` (already fitted on `fit_set`) and return the calibration record.

    folds >= 2: cross-fitting on fit_set with detectors from `make()` (with leave_one_out=True, for a detector
    that has `heldout_maps`, leave-one-out in closed form instead); else the held-out `calib` images; without
    them, the training images themselves (basis "train")."""
    fold_info, space = None, dup_space(det)
    if folds >= 2 and leave_one_out and hasattr(det, "heldout_maps"):
        stats, fold_info, dup = leave_group_out(det, fit_set, space=space)
        basis = "crossfit"
    elif folds >= 2:
        if make is None:
            raise ParameterError("cross-fitting needs a way to make fresh detectors (make)")
        stats, fold_info, dup = cross_fit(make, fit_set, folds, seed, space=space)
        basis = "crossfit"
    elif calib is not None:
        stats = normal_statistics(det, calib.images, calib.names)
        dup = holdout_duplicates(calib.images, fit_set.images, calib.names, space)
        basis = "holdout"
    else:
        stats = normal_statistics(det, fit_set.images, fit_set.names)
        dup = {"checked": False, "reason": "the threshold rests on the training images themselves"}
        basis = "train"
    det.threshold_ = threshold_from(stats, max_fpr, basis=basis)
    return build_record(stats, det.threshold_, dup=dup, n_train=len(fit_set), folds=fold_info)


def read_calibration(run: str | Path) -> dict[str, Any] | None:
    """The calibration.json record of a run folder, None when it has none; a RunFolderError when unreadable."""
    f = Path(run) / CALIBRATION_FILE
    if not f.is_file():
        return None
    try:
        record = json.loads(f.read_text())
    except (ValueError, OSError) as e:
        raise RunFolderError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(record, dict) or not isinstance(record.get("scores"), list):
        raise RunFolderError(f"{f} is not a calibration record (no scores list)")
    return record


def _stats_of(record: dict[str, Any]) -> NormalStats:
    maps = record.get("map_max")
    return NormalStats(scores=np.asarray(record["scores"], dtype=np.float64), names=list(record.get("names") or []),
                       map_max=None if maps is None else np.asarray(maps, dtype=np.float64),
                       fold=None if record.get("fold") is None else np.asarray(record["fold"]))


# ---- re-picking a run's threshold -------------------------------------------------------------------------
def _score_files(det: Any, paths: Sequence[str | Path], on_error: str) -> tuple[NormalStats, list[Path]]:
    from anomalab import scoring

    files = scoring.collect_files(paths)
    maps = gives_maps(det)
    scores, names, maxima, samples, used = [], [], [], [], []
    for row in scoring.iter_scores(det, files, on_error=on_error, maps=maps):
        scores.append(row["score"])
        names.append(row["name"])
        used.append(row["path"])
        if maps:
            m, s = _map_stats(row["map"][None])
            maxima.append(m)
            samples.append(s)
    if not scores:
        raise DataError(f"none of the {len(files)} normal image files could be read")
    stats = NormalStats(scores=np.asarray(scores, dtype=np.float64), names=names)
    if maps:
        stats.map_max, stats.map_sample = np.concatenate(maxima), np.concatenate(samples)
    return stats, used


def _training_images(config: dict[str, Any]) -> tuple[Tensor | None, str | None]:
    """The run's training images (reloaded from its data spec), or (None, why not)."""
    from anomalab.data.specs import DEFAULT_TEXTURES_ROOT, check_spec, load_spec
    from anomalab.runs.fit import calibration_split

    try:
        kind, target, opts = check_spec(config["data"])
        if kind == "textures" and not (Path(opts.get("root", DEFAULT_TEXTURES_ROOT)) / target / "train").is_dir():
            return None, "the texture set is not on disk (it is not rebuilt for this check)"
        train, _, _ = load_spec(config["data"])
    except (UserError, OSError, KeyError) as e:
        return None, f"the training data could not be reloaded ({e})"
    frac = 0.0 if (config.get("calib_folds") or 0) >= 2 else float(config.get("calib_frac", 0.0))
    return calibration_split(train, frac, seed=int(config.get("calibration_seed", 0)))[0].images, None


def _given_duplicates(det: Any, config: dict[str, Any], files: Sequence[Path], names: Sequence[str]
                      ) -> dict[str, Any]:
    from anomalab.data.folder import read_image

    train, why = _training_images(config)
    if train is None:
        return {"checked": False, "reason": why}
    space = dup_space(det)
    ref = space.features(train[torch.as_tensor(_spread_pick(len(train), space.max_refs))])
    pick = _spread_pick(len(files), space.max_queries)
    query = torch.cat([space.features(torch.from_numpy(read_image(files[i], channels=1))[None]) for i in pick])
    ratio = space.nearest(query, ref, space.variance(ref))
    return duplicate_record(ratio, [names[i] for i in pick], len(files), space, len(ref))


def _update_evaluation(ev: dict[str, Any], thr: Threshold) -> dict[str, Any] | None:
    """evaluation.json with its threshold-dependent records recomputed from its own scores at `thr`."""
    if ev.get("normalize") is not None or "scores" not in ev or "labels" not in ev:
        return None
    from anomalab.report.verdicts import confusion_matrix, per_class, threshold_counts

    ev = dict(ev)
    scores, labels = np.asarray(ev["scores"], dtype=np.float64), np.asarray(ev["labels"], dtype=np.int64)
    flagged, normal = scores > thr.value, labels == 0
    metrics = dict(ev.get("metrics") or {})
    if normal.any():
        metrics["fpr_at_threshold"] = float(flagged[normal].mean())
    if (~normal).any():
        metrics["tpr_at_threshold"] = float(flagged[~normal].mean())
    extra = dict(ev.get("extra") or {})
    extra["threshold"] = thr.to_dict()
    extra["counts"] = threshold_counts(scores, labels, thr.value)
    extra["confusion_matrix"] = confusion_matrix(extra["counts"])
    if "per_class" in extra and ev.get("classes") is not None:
        extra["per_class"] = per_class(scores, labels, np.asarray(ev["classes"]), extra.get("class_names"),
                                       thr.value)
    ev["metrics"], ev["extra"] = metrics, extra
    return _clean(ev)


def _report_title(config: dict[str, Any]) -> str:
    title = f"{config.get('detector', '?')} on {config.get('data_name', config.get('data', '?'))}"
    strategy = (config.get("continual") or {}).get("strategy")
    return title + (f" ({strategy} update)" if strategy else "")


def retune(run_dir: str | Path, *, max_fpr: float | None = None, normal: Sequence[str | Path] | None = None,
           value: float | None = None, pixel_value: float | None = None, on_error: str = "skip") -> dict[str, Any]:
    """Re-pick the thresholds of the run folder `run_dir` without refitting (`anomalab threshold`).

    max_fpr: the quantile of the normal scores the run keeps (calibration.json); normal: files or folders of
    normal images to score and pick from instead (at max_fpr, default the current rate), which then become the
    kept scores; value: an image threshold set by hand; pixel_value: a pixel threshold set by hand (else the
    pixel threshold follows max_fpr where maps are kept, or stays). Under the run's lock, rewrites atomically
    the threshold in detector/detector.json, calibration.json (the previous threshold, and scores replaced by
    `normal`, go to its history), the threshold-dependent records of evaluation.json (from its stored
    scores), report.html, and run.json's file list when calibration.json is new. Weights, scores and the
    other files are untouched. Returns {"threshold", "previous", "record", "warnings", "changed", "metrics"}."""
    import math

    from anomalab.runs.atomic import TargetLock, write_file_atomic
    from anomalab.runs.folder import RUN_FILE, RunFolder

    def finite(name: str, v: float | None) -> None:
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ParameterError(f"{name} must be a finite number, got {v!r}")

    finite("--value", value)
    finite("--pixel-value", pixel_value)
    if max_fpr is not None and not (isinstance(max_fpr, (int, float)) and 0.0 <= max_fpr < 1.0):
        raise ParameterError(f"--max-fpr must be in [0, 1), got {max_fpr!r}")
    if value is not None and (max_fpr is not None or normal):
        raise ParameterError("--value sets the threshold by hand: give it without --max-fpr or --normal")
    if max_fpr is None and not normal and value is None and pixel_value is None:
        raise ParameterError("say how to pick the threshold: --max-fpr F (from the kept normal scores), --normal "
                             "DIR (score other normal images), --value X, or --pixel-value Y")
    run = RunFolder(run_dir)
    meta_file = run.path / "detector" / "detector.json"
    with TargetLock(run.path):
        try:
            meta = json.loads(meta_file.read_text())
        except (ValueError, OSError) as e:
            raise RunFolderError(f"{meta_file} cannot be read: {e}") from None
        old = None if meta.get("threshold") is None else Threshold.from_dict(meta["threshold"])
        record = read_calibration(run.path)
        config = run.config
        history = list((record or {}).get("history") or [])
        if record is not None or old is not None:
            history.append({"replaced": now(), "threshold": None if old is None else old.to_dict(),
                            "how": (record or {}).get("how") or (None if old is None else describe(old))})
        kept = None if record is None else _stats_of(record)
        dup = None if record is None else record.get("near_duplicates")
        folds, n_train = (record or {}).get("folds"), (record or {}).get("n_train")
        source = (record or {}).get("source")
        rate = max_fpr if max_fpr is not None else (old.max_fpr if old is not None and old.method == "quantile"
                                                    else 0.01)
        kept_pixel = None if old is None else old.pixel_value
        if normal:
            det = run.detector()
            kept, files = _score_files(det, normal, on_error)
            if record is not None:
                history[-1]["replaced_scores"] = {k: record.get(k) for k in ("basis", "names", "scores", "map_max")}
            dup = _given_duplicates(det, config, files, kept.names)
            folds, source = None, {"normal": [str(p) for p in normal]}
            thr = threshold_from(kept, rate, basis="normal")
        elif max_fpr is not None:
            if kept is None:
                raise RunFolderError(f"{run.path} keeps no normal scores (no {CALIBRATION_FILE}: the run was fitted "
                                     "before they were kept): give normal images with --normal DIR, or a value "
                                     "with --value X")
            thr = threshold_from(kept, max_fpr, basis=record.get("basis", "holdout"))
        elif value is not None:
            n = 0 if kept is None else len(kept)
            thr = Threshold(value=float(value), max_fpr=float(np.mean(kept.scores > value)) if n else 0.0, n_normal=n,
                            method="value", basis="none" if kept is None else record.get("basis", "holdout"),
                            created=now())
        else:
            if old is None:
                raise RunFolderError(f"{run.path} has no image threshold to keep; set one with --max-fpr, --normal "
                                     "or --value")
            thr = Threshold(**{**old.to_dict(), "created": now()})
        if (normal or max_fpr is not None) and thr.pixel_value is not None:
            pixel_how = "quantile"  # re-picked with the image threshold, from the same images' maps
        elif normal or max_fpr is not None or value is not None:
            thr.pixel_value, pixel_how = kept_pixel, "kept"
        else:
            pixel_how = ((record or {}).get("pixel") or {}).get("method", "kept")
        if pixel_value is not None:
            thr.pixel_value, pixel_how = float(pixel_value), "value"
        stats = kept if kept is not None else NormalStats(scores=np.empty(0), names=[])
        new_record = build_record(stats, thr, dup=dup, n_train=n_train, folds=folds, history=history, source=source,
                                  pixel=pixel_how)
        if not normal and record is not None and record.get("maps") is not None:
            new_record["maps"] = record["maps"]
        Threshold.from_dict(thr.to_dict())  # the record written must load
        changed = [write_file_atomic(run.path / CALIBRATION_FILE, json.dumps(new_record, indent=1) + "\n")]
        ev_file = run.path / "evaluation.json"
        metrics = None
        if ev_file.is_file():
            ev = _update_evaluation(json.loads(ev_file.read_text()), thr)
            if ev is not None:
                changed.append(write_file_atomic(ev_file, json.dumps(ev, indent=1)))
                metrics = {k: ev["metrics"][k] for k in ("fpr_at_threshold", "tpr_at_threshold") if k in ev["metrics"]}
        meta["threshold"] = thr.to_dict()
        changed.append(write_file_atomic(meta_file, json.dumps(meta, indent=1, default=str)))
        if (run.path / "report.html").is_file():
            from anomalab.report.html import write_report

            changed.append(write_report([run.path], run.path / "report.html", title=_report_title(config)))
        marker_file = run.path / RUN_FILE
        if marker_file.is_file():
            marker = json.loads(marker_file.read_text())
            files = marker.get("files")
            if isinstance(files, list) and CALIBRATION_FILE not in files:
                marker["files"] = sorted([*files, CALIBRATION_FILE])
                changed.append(write_file_atomic(marker_file, json.dumps(marker, indent=1, default=str)))
    return {"threshold": thr, "previous": old, "record": new_record, "warnings": new_record["warnings"],
            "changed": changed, "metrics": metrics}
