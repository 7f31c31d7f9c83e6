"""Building blocks of the patch-feature detectors (`patchcore`, `padim`): feature maps on one grid, greedy
k-centre coreset, chunked nearest-neighbour search, Gaussian smoothing of anomaly maps.

Everything works on float32 torch tensors on any device and in bounded memory: the coreset and the
nearest-neighbour search never form a full N x M distance matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from anomalab import distributed
from anomalab.errors import ParameterError
from anomalab.nets.effnet_lite0 import BACKBONES, LEVELS, EfficientNetLite, make_backbone


def rank_batches(batches: Iterable[Tensor], group, owner: str) -> Iterator[Tensor]:
    """The fit batches this process extracts: all of them, or under `anomalab.distributed` its share
    (`my_batches`); each checked as images, empty ones skipped."""
    from anomalab.data.transforms import check_images

    for batch in (batches if group is None else distributed.my_batches(batches, group)):
        batch = check_images(batch, what=f"{owner}.fit")
        if len(batch):
            yield batch


def build_backbone(name: str, weights, seed: int, device: torch.device, owner: str) -> EfficientNetLite:
    """The frozen backbone in eval mode on `device`. With weights=None the random initialisation is drawn
    from `seed` (without touching the global generator), so a refit or a reload rebuilds the same net."""
    if name not in BACKBONES:
        raise ParameterError(f"{owner}: backbone must be one of {', '.join(BACKBONES)}, got {name!r}")
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = make_backbone(name, None)
    else:
        net = make_backbone(name, weights)
    return net.to(device).eval().requires_grad_(False)


def check_levels(levels, owner: str, at_least: int = 1) -> tuple[int, ...]:
    """Sorted, distinct backbone levels; ParameterError unless they are `at_least` levels of 1..9."""
    try:
        out = tuple(sorted({int(v) for v in levels}))
    except (TypeError, ValueError):
        raise ParameterError(f"{owner}: levels must be a list of integers in 1..9, got {levels!r}") from None
    if len(out) < at_least or not set(out) <= set(LEVELS):
        raise ParameterError(f"{owner}: levels must be at least {at_least} distinct levels of 1..9, "
                             f"got {levels!r}")
    return out


def on_finest_grid(maps: list[Tensor]) -> Tensor:
    """(N, C_i, h_i, w_i) maps, finest first -> (N, sum C_i, h_0, w_0): coarser maps upsampled bilinearly to
    the first map's grid and concatenated along the channels."""
    h, w = maps[0].shape[-2:]
    return torch.cat([m if m.shape[-2:] == (h, w) else
                      F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False) for m in maps], 1)


def _blur_matrix(size: int, sigma: float, radius: int, device, dtype) -> Tensor:
    """(size, size) matrix of a 1-D Gaussian filter with symmetric borders (the edge sample repeated:
    scipy.ndimage's "reflect" mode), so that filtering a signal v is K @ v."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (t / sigma) ** 2)
    taps = taps / taps.sum()
    src = torch.arange(size)[:, None] + torch.arange(-radius, radius + 1)[None]  # (size, taps)
    src = src % (2 * size)
    src = torch.where(src >= size, 2 * size - 1 - src, src)
    k = torch.zeros(size, size, dtype=torch.float64)
    k.scatter_add_(1, src, taps.expand(size, -1).contiguous())
    return k.to(device=device, dtype=dtype)


def gaussian_blur(maps: Tensor, sigma: float, size: tuple[int, int] | None = None) -> Tensor:
    """(N, H, W) maps smoothed by a Gaussian of standard deviation `sigma` pixels (separable, truncated at
    4 sigma, symmetric borders as scipy.ndimage.gaussian_filter's default), as two matrix products.
    size: (H, W) as plain integers, so that a traced graph (ONNX export) holds the filters as constants
    instead of building them from the input's shape; default: the maps' own."""
    if sigma <= 0:
        return maps
    radius = max(1, int(4 * sigma + 0.5))
    h, w = size if size is not None else maps.shape[-2:]
    k_h = _blur_matrix(h, sigma, radius, maps.device, maps.dtype)
    k_w = _blur_matrix(w, sigma, radius, maps.device, maps.dtype)
    return k_h @ maps @ k_w.T


def nearest_neighbours(queries: Tensor, bank: Tensor, bank_sq: Tensor | None = None, query_chunk: int = 256,
                       bank_chunk: int = 1024, with_index: bool = True) -> tuple[Tensor, Tensor | None]:
    """Euclidean distance from each of `queries` (Q, D) to its nearest row of `bank` (M, D), and that row's
    index: ((Q,) float, (Q,) long), or (distances, None) with with_index=False (faster: no arg-min).

    Squared distances are computed as |a|^2 - 2 a.b + |b|^2 by matrix products over blocks of
    `query_chunk` queries x `bank_chunk` bank rows with a running minimum, so memory stays at one block
    whatever Q and M are; the default block (1 MiB of float32) stays in cache, several times faster on a
    CPU than large blocks. `bank_sq` = (bank * bank).sum(1) may be passed precomputed."""
    if bank_sq is None:
        bank_sq = (bank * bank).sum(1)
    best = torch.empty(len(queries), dtype=bank.dtype, device=bank.device)
    arg = torch.empty(len(queries), dtype=torch.long, device=bank.device) if with_index else None
    for i in range(0, len(queries), query_chunk):
        q = queries[i : i + query_chunk]
        q_best = q_arg = None
        for j in range(0, len(bank), bank_chunk):
            # |b|^2 - 2 q.b and its row minimum; |q|^2 is added once at the end
            d = torch.addmm(bank_sq[None, j : j + bank_chunk], q, bank[j : j + bank_chunk].T, alpha=-2)
            if not with_index:
                v = d.amin(1)
                q_best = v if q_best is None else torch.minimum(q_best, v, out=q_best)
                continue
            v, k = d.min(1)
            if q_best is None:
                q_best, q_arg = v, k
            else:
                better = v < q_best
                q_best = torch.where(better, v, q_best)
                q_arg = torch.where(better, k + j, q_arg)
        best[i : i + query_chunk] = (q_best + (q * q).sum(1)).clamp_min_(0).sqrt_()
        if with_index:
            arg[i : i + query_chunk] = q_arg
    return best, arg


def max_nearest_distance(queries: Tensor, bank: Tensor, bank_sq: Tensor | None = None, coarse: int = 2048,
                         top: int = 4) -> tuple[Tensor, Tensor]:
    """For queries (B, P, D), the largest over each image's P patches of the distance to the nearest bank
    row, and which patch: ((B,) float, (B,) long). Equal to `nearest_neighbours` followed by a max, at a
    fraction of the cost when most patches lie close to the bank:

    1. every patch's distance to the nearest of the first `coarse` bank rows is an upper bound u_p (a
       coreset bank starts with its most spread-out rows, so the bound is already tight);
    2. the `top` patches of largest u_p per image get their exact distance over the whole bank; the largest,
       L, is a lower bound on the image's answer;
    3. only the patches with u_p > L can still exceed L: they alone are searched over the rest of the bank.
    """
    b, p, dim = queries.shape
    flat = queries.reshape(-1, dim)
    if bank_sq is None:
        bank_sq = (bank * bank).sum(1)
    if len(bank) <= 2 * coarse:
        d, _ = nearest_neighbours(flat, bank, bank_sq, with_index=False)
        return d.view(b, p).max(1)
    upper, _ = nearest_neighbours(flat, bank[:coarse], bank_sq[:coarse], with_index=False)
    upper = upper.view(b, p)
    rows = torch.arange(b, device=flat.device)[:, None]
    cand = upper.topk(min(top, p), dim=1).indices  # (B, top)
    exact, _ = nearest_neighbours(flat[(cand + rows * p).flatten()], bank, bank_sq, with_index=False)
    values = torch.full((b, p), -math.inf, dtype=upper.dtype, device=upper.device)
    values[rows, cand] = exact.view(b, -1)
    lower = values.amax(1)
    alive = upper > lower[:, None]
    alive[rows, cand] = False
    idx = alive.flatten().nonzero()[:, 0]
    if len(idx):
        rest, _ = nearest_neighbours(flat[idx], bank[coarse:], bank_sq[coarse:], with_index=False)
        values.view(-1)[idx] = torch.minimum(upper.flatten()[idx], rest)
    return values.max(1)


def random_projection(x: Tensor, dims: int, generator: torch.Generator) -> Tensor:
    """Johnson-Lindenstrauss projection of (N, D) rows to `dims` dimensions by a Gaussian matrix with
    entries N(0, 1/dims) (squared distances kept in expectation); `x` itself when D <= dims."""
    if x.shape[1] <= dims:
        return x
    w = torch.randn(x.shape[1], dims, generator=generator) / math.sqrt(dims)
    return x @ w.to(x)


def greedy_coreset(x: Tensor, n: int, seed: int = 0, dims: int | None = 128, pool: int = 2048,
                   block: int = 2**20) -> Tensor:
    """Indices (n,) of `n` rows of x (N, D) chosen by greedy k-centre selection, in the order chosen.

    Start from a seeded random row; then repeatedly add the row farthest from all rows chosen so far
    (PatchCore's Algorithm 1, Sener & Savarese 2018). Distances are taken on a seeded Johnson-Lindenstrauss
    projection to `dims` dimensions (None, or D <= dims: on x itself).

    The selection is the plain greedy sequence, computed in rounds so that most of the work is matrix
    products instead of one pass over all N rows per choice: each round takes the `pool` rows of largest
    current distance d_min as candidates and keeps choosing among them (updating only their distances) while
    the best candidate's distance is at least the pool's smallest, tau; every other row's d_min is <= tau and
    only decreases, so that candidate is the one a full pass would choose. Then one blocked matrix product
    updates all N rows with the round's choices, in row blocks of about `block` distances (4 MiB: large
    blocks are several times slower on a CPU, memory-bound). Ties aside (exact float equality), the result
    equals the one-at-a-time loop.
    """
    num = len(x)
    n = max(1, min(int(n), num))
    g = torch.Generator().manual_seed(int(seed))
    x = x.float()
    if dims is not None:
        x = random_projection(x, int(dims), g)
    x = x.contiguous()
    sq = (x * x).sum(1)
    start = int(torch.randint(num, (1,), generator=g))
    chosen = [start]
    d_min = torch.addmv(sq + sq[start], x, x[start], alpha=-2)  # squared distances to the first choice
    d_min[start] = -math.inf
    neg_inf = torch.tensor(-math.inf, device=x.device)
    while len(chosen) < n:
        size = min(int(pool), num - len(chosen))
        cand_d, cand = d_min.topk(size)
        tau = float(cand_d[-1]) if size < num - len(chosen) else -math.inf
        cand_x, cand_sq = x[cand], sq[cand]
        picked: list[int] = []
        while len(chosen) < n:
            k = int(cand_d.argmax())
            if picked and float(cand_d[k]) < tau:
                break
            picked.append(k)
            chosen.append(int(cand[k]))
            d = torch.addmv(cand_sq + cand_sq[k], cand_x, cand_x[k], alpha=-2)
            torch.minimum(cand_d, d, out=cand_d)
            cand_d[k] = neg_inf
        centres = cand_x[picked]
        c_sq = cand_sq[picked]
        rows = max(64, int(block) // len(picked))
        for i in range(0, num, rows):
            d = torch.addmm(c_sq[None], x[i : i + rows], centres.T, alpha=-2).amin(1) + sq[i : i + rows]
            torch.minimum(d_min[i : i + rows], d, out=d_min[i : i + rows])
        d_min[cand[picked]] = neg_inf
    return torch.tensor(chosen, dtype=torch.long)


def covering_radius(x: Tensor, centres: Tensor) -> float:
    """max over rows of x of the distance to the nearest of `centres` (the k-centre objective)."""
    return float(nearest_neighbours(x, centres)[0].max())
