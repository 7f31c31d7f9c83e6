"""FactorVAE disentanglement metric (Kim & Mnih 2018, "Disentangling by Factorising", section 4) in the
variant of disentanglement_lib (Locatello et al. 2019), plus the added-factor correspondence of the
beta-VAEGAN write-up (docs/beta_vaegan.md).

A vote: draw L factor vectors uniformly, give them all the same random value of one random factor k,
render and encode them (encoder means), divide each latent dimension's variance over the L codes by
its global variance over the data, and vote "dimension argmin -> factor k". A majority-vote classifier
maps each dimension to the factor it was voted for most; the score is its accuracy on fresh votes.

disentanglement_lib variant (the default here): global variances from 10,000 samples (ddof 1),
dimensions with a global std < 0.05 are pruned (they cannot be voted for), L = 64, 10,000 votes
train the classifier and 5,000 fresh votes give the reported eval accuracy. The paper's own variant:
L = 100, 800 votes (`PAPER_VARIANT`); that version also prunes collapsed dims and uses the same
normalisation. As in disentanglement_lib, the vote's argmin is taken among the active dimensions only.

Pooled votes (an option of ours, for slow encoders): `EncodedPool` encodes `pool_size` uniformly drawn
images once; each vote then takes its L images from the pool rows that share the fixed factor's value
(drawn without replacement). Every vote batch has the same distribution as in the exact metric, but
votes reuse images, so it costs pool_size encodings instead of (num_train + num_eval) * L; the global
variances use the first num_variance_estimate pool rows. Pass `pool=` to share one pool between calls.

Datasets only need `factor_sizes` and `images_from_factors((N, K) int) -> (N, C, H, W)`;
the representation is any `encode(images) -> (N, D)` (a Tensor or an array).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from torch import Tensor

PRUNE_STD = 0.05  # disentanglement_lib: dims with a global std below this are "collapsed"
LIB_VARIANT = dict(batch_size=64, num_train=10_000, num_eval=5_000, num_variance_estimate=10_000)
PAPER_VARIANT = dict(batch_size=100, num_train=800, num_eval=800, num_variance_estimate=10_000)
QUICK_VARIANT = dict(batch_size=64, num_train=1_000, num_eval=500, num_variance_estimate=10_000)


class FactorData(Protocol):
    factor_sizes: tuple[int, ...]

    def images_from_factors(self, factors: np.ndarray) -> Tensor: ...


Encode = Callable[[Tensor], "Tensor | np.ndarray"]


@dataclass
class FactorVAEResult:
    train_accuracy: float
    eval_accuracy: float
    num_active_dims: int
    votes: np.ndarray  # (num_factors, num_dims) eval votes: factor k voted to dim d
    classifier: np.ndarray  # (num_dims,) factor each dim is mapped to
    global_variances: np.ndarray  # (num_dims,)

    def to_dict(self) -> dict:
        return {"train_accuracy": self.train_accuracy, "eval_accuracy": self.eval_accuracy,
                "num_active_dims": self.num_active_dims, "votes": self.votes.tolist(),
                "classifier": self.classifier.tolist(), "global_variances": self.global_variances.tolist()}


def _encode(encode: Encode, data: FactorData, factors: np.ndarray, chunk: int = 2048) -> np.ndarray:
    out = []
    for i in range(0, len(factors), chunk):
        z = encode(data.images_from_factors(factors[i : i + chunk]))
        out.append(np.asarray(z.detach().cpu() if isinstance(z, Tensor) else z, dtype=np.float64))
    return np.concatenate(out)


def sample_factors(sizes: tuple[int, ...], n: int, rng: np.random.Generator) -> np.ndarray:
    """n factor vectors, each factor uniform over its values: (n, K) int64."""
    return np.stack([rng.integers(0, s, size=n) for s in sizes], axis=1)


def global_variances(encode: Encode, data: FactorData, rng: np.random.Generator,
                     num_samples: int = 10_000) -> np.ndarray:
    """Variance (ddof 1) of each latent dimension over `num_samples` uniformly drawn images: (D,)."""
    return np.var(_encode(encode, data, sample_factors(data.factor_sizes, num_samples, rng)), axis=0, ddof=1)


def votes(encode: Encode, data: FactorData, rng: np.random.Generator, variances: np.ndarray,
          num_votes: int, batch_size: int = 64, factor: int | None = None,
          votes_per_call: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """`num_votes` votes -> (fixed factor (V,), voted dimension (V,)); the dimension is an index among
    ALL dims (argmin over the active ones, mapped back). `factor` fixes which factor every vote fixes
    (the correspondence measure); None draws it uniformly per vote. Dims are active when std >= 0.05."""
    active = _active(variances)
    sizes = data.factor_sizes
    ks, dims = [], []
    for start in range(0, num_votes, votes_per_call):
        n = min(votes_per_call, num_votes - start)
        k = np.full(n, factor) if factor is not None else rng.integers(0, len(sizes), size=n)
        f = sample_factors(sizes, n * batch_size, rng).reshape(n, batch_size, len(sizes))
        for v in range(n):
            f[v, :, k[v]] = f[v, 0, k[v]]
        z = _encode(encode, data, f.reshape(n * batch_size, -1)).reshape(n, batch_size, -1)
        local = np.var(z, axis=1, ddof=1)
        ratio = local[:, active] / variances[active]
        ks.append(k)
        dims.append(active[np.argmin(ratio, axis=1)])
    return np.concatenate(ks), np.concatenate(dims)


@dataclass
class EncodedPool:
    """Factors (P, K) and codes (P, D) of P uniformly drawn images, grouped by each factor's value."""

    factors: np.ndarray
    codes: np.ndarray

    @classmethod
    def build(cls, encode: Encode, data: FactorData, rng: np.random.Generator, size: int) -> EncodedPool:
        f = sample_factors(data.factor_sizes, size, rng)
        return cls(f, _encode(encode, data, f))

    def __post_init__(self) -> None:
        self.groups = [[np.flatnonzero(self.factors[:, k] == v) for v in np.unique(self.factors[:, k])]
                       for k in range(self.factors.shape[1])]

    def variances(self, num_samples: int) -> np.ndarray:
        return np.var(self.codes[:num_samples], axis=0, ddof=1)

    def votes(self, rng: np.random.Generator, variances: np.ndarray, num_votes: int, batch_size: int = 64,
              factor: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """As `votes`, with each vote's images taken from the pool."""
        active = _active(variances)
        k = np.full(num_votes, factor) if factor is not None else rng.integers(0, len(self.groups), num_votes)
        dims = np.empty(num_votes, dtype=np.int64)
        for i, ki in enumerate(k):
            group = self.groups[ki][rng.integers(0, len(self.groups[ki]))]
            rows = rng.choice(group, size=batch_size, replace=len(group) < batch_size)
            local = np.var(self.codes[rows][:, active], axis=0, ddof=1)
            dims[i] = active[np.argmin(local / variances[active])]
        return k, dims


def _active(variances: np.ndarray) -> np.ndarray:
    active = np.flatnonzero(np.sqrt(variances) >= PRUNE_STD)
    if len(active) == 0:
        raise ValueError("no active latent dimension (every global std < 0.05)")
    return active


def _vote_matrix(k: np.ndarray, d: np.ndarray, num_factors: int, num_dims: int) -> np.ndarray:
    m = np.zeros((num_factors, num_dims), dtype=np.int64)
    np.add.at(m, (k, d), 1)
    return m


def factor_vae_score(encode: Encode, data: FactorData, rng: np.random.Generator, batch_size: int = 64,
                     num_train: int = 10_000, num_eval: int = 5_000, num_variance_estimate: int = 10_000,
                     variances: np.ndarray | None = None, pool_size: int | None = None,
                     pool: EncodedPool | None = None) -> FactorVAEResult:
    """FactorVAE metric, disentanglement_lib variant by default (L = batch_size = 64, 10,000 training
    votes, 5,000 eval votes, variances from 10,000 samples). `encode(images) -> (N, D)` should return
    the encoder means. Pass **PAPER_VARIANT for Kim & Mnih's L = 100 / 800 votes, **QUICK_VARIANT
    (1,000 / 500 votes) for progress tracking. `pool_size` / `pool`: pooled votes (module doc).
    Returns eval accuracy (the reported number) and more."""
    if pool is None and pool_size:
        pool = EncodedPool.build(encode, data, rng, max(pool_size, num_variance_estimate))
    if variances is None:
        variances = (pool.variances(num_variance_estimate) if pool is not None
                     else global_variances(encode, data, rng, num_variance_estimate))
    num_factors, num_dims = len(data.factor_sizes), len(variances)
    active = int((np.sqrt(variances) >= PRUNE_STD).sum())
    if active == 0:
        empty = np.zeros((num_factors, num_dims), dtype=np.int64)
        return FactorVAEResult(0.0, 0.0, 0, empty, np.zeros(num_dims, dtype=np.int64), variances)

    def draw(n: int) -> np.ndarray:
        kd = (pool.votes(rng, variances, n, batch_size) if pool is not None
              else votes(encode, data, rng, variances, n, batch_size))
        return _vote_matrix(*kd, num_factors, num_dims)

    train = draw(num_train)
    classifier = np.argmax(train, axis=0)
    cols = np.arange(num_dims)
    ev = draw(num_eval)
    return FactorVAEResult(
        train_accuracy=float(train[classifier, cols].sum() / train.sum()),
        eval_accuracy=float(ev[classifier, cols].sum() / ev.sum()),
        num_active_dims=active, votes=ev, classifier=classifier, global_variances=variances,
    )


def factor_correspondence(encode: Encode, data: FactorData, rng: np.random.Generator, factor: int, dim: int,
                          num_votes: int = 100, batch_size: int = 64,
                          variances: np.ndarray | None = None, num_variance_estimate: int = 10_000,
                          pool: EncodedPool | None = None) -> float:
    """Share of `num_votes` votes with `factor` fixed that name latent dimension `dim` (the beta-VAEGAN
    source's "added-factor correspondence": factor = colour, dim = the added dimension). A pruned dim
    (global std < 0.05) is never named, so it scores 0."""
    if variances is None:
        variances = (pool.variances(num_variance_estimate) if pool is not None
                     else global_variances(encode, data, rng, num_variance_estimate))
    if not (np.sqrt(variances) >= PRUNE_STD).any():
        return 0.0
    if pool is not None:
        _, d = pool.votes(rng, variances, num_votes, batch_size, factor=factor)
    else:
        _, d = votes(encode, data, rng, variances, num_votes, batch_size, factor=factor)
    return float(np.mean(d == dim))
