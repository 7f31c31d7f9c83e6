"""Inference copies of conv nets with each eval-mode BatchNorm folded into the convolution before it.

In eval mode BatchNorm is an affine map per channel, so conv -> BN equals one conv with rescaled weights
and a bias (torch.nn.utils.fusion.fuse_conv_bn_eval does the arithmetic). The folded net computes the same
function (to float rounding) without the BatchNorm passes, forward and backward: AnoGAN's latent search,
hundreds of forward/backward passes per query through G and D, runs about twice as fast with it
(benchmarks/bench_anogan.py). torch.fx's fusion pass needs a traceable module; this walks the
`nn.Sequential` containers instead, which is how the project's nets are built.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _fold_sequential(seq: nn.Sequential) -> nn.Sequential:
    mods, out, i = list(seq), [], 0
    while i < len(mods):
        conv, nxt = mods[i], mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(conv, CONVS) and isinstance(nxt, NORMS) and nxt.track_running_stats:
            out.append(fuse_conv_bn_eval(conv, nxt, transpose=isinstance(conv, nn.modules.conv._ConvTransposeNd)))
            i += 2
        else:
            out.append(_fold_children(conv))
            i += 1
    return nn.Sequential(*out)


def _fold_children(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        setattr(module, name, _fold_sequential(child) if isinstance(child, nn.Sequential) else _fold_children(child))
    return module


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An eval-mode copy of `net` in which every conv directly followed by a BatchNorm (inside an
    nn.Sequential) is one conv; `net` is left as it is. Parameters of the copy need no gradients."""
    folded = copy.deepcopy(net).eval()
    folded = _fold_sequential(folded) if isinstance(folded, nn.Sequential) else _fold_children(folded)
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded.eval()
