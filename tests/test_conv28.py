"""conv28, the 28x28 convolutional AE/VAE network of the source (docs/detectors/conv_ae_vae.md), exactly, and
how it adapts to other inputs."""

import pytest
import torch
from torch import nn

import anomalab
from anomalab.nets.conv28 import Decoder28, Encoder28, model_size


def _params(*nets):
    return sum(p.numel() for n in nets for p in n.parameters())


@pytest.mark.parametrize("z, ae, vae", [(2, 23_240, 24_392), (3, 24_392, 26_120), (64, 94_664, 131_528)])
def test_parameter_counts_match_the_source(z, ae, vae):
    assert _params(Encoder28(1, z), Decoder28(1, z)) == ae
    assert _params(Encoder28(1, z, variational=True), Decoder28(1, z)) == vae


def test_layer_list_matches_the_source():
    enc, dec = Encoder28(1, 2, variational=True), Decoder28(1, 2)
    layers = [m for m in [*enc.modules(), *dec.modules()] if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    convs = [(type(m).__name__, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0],
              m.bias is None) for m in layers]
    assert convs == [
        ("Conv2d", 1, 4, 4, 2, 1, True), ("Conv2d", 4, 16, 4, 2, 1, True), ("Conv2d", 16, 64, 3, 2, 0, True),
        ("Conv2d", 64, 2, 3, 2, 0, True), ("Conv2d", 64, 2, 3, 2, 0, True),
        ("ConvTranspose2d", 2, 64, 3, 1, 0, True), ("ConvTranspose2d", 64, 16, 3, 2, 0, True),
        ("ConvTranspose2d", 16, 4, 4, 2, 1, True), ("ConvTranspose2d", 4, 1, 4, 2, 1, True),
    ]
    assert [m.num_features for m in enc.modules() if isinstance(m, nn.BatchNorm2d)] == [16, 64]
    assert [m.num_features for m in dec.modules() if isinstance(m, nn.BatchNorm2d)] == [64, 16, 4]
    x = torch.rand(3, 1, 28, 28)
    mean, std = enc(x)
    assert mean.shape == (3, 2) and (std > 0).all()
    assert dec(mean).shape == (3, 1, 28, 28)


@pytest.mark.parametrize("size, expected", [(28, 28), (32, 28), (64, 56), (112, 112), (128, 112), (224, 224)])
def test_other_sizes_map_to_28_times_a_power_of_two(size, expected):
    assert model_size(size) == expected


def test_rgb_64px_images_work_end_to_end():
    x = torch.rand(6, 3, 64, 64)
    det = anomalab.create("conv_ae", latent_dim=4, epochs=1, batch_size=3).fit(x)
    assert det.input_shape_ == (3, 56, 56)
    assert det.reconstruct(x).shape == (6, 3, 56, 56)
    assert det.score(x).shape == (6,) and det.score_map(x).shape == (6, 64, 64)
    assert det.score(torch.rand(2, 1, 40, 40)).shape == (2,)  # gray input to an RGB model is converted
