"""Training checkpoints (`anomalab.train.epochs.Checkpoint`): a run cut mid-training and resumed from its
checkpoint ends bit for bit where an uncut run ends; a checkpoint of other settings or images is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import anomalab as al
from anomalab.errors import LoadError
from anomalab.train.epochs import Checkpoint

TINY = {
    "conv_ae": dict(latent_dim=8, batch_size=8),
    "egbad": dict(latent_dim=8, batch_size=8),  # global RNG: latents, dropout; EMA counter
    "ganomaly": dict(latent_dim=8, width=8, batch_size=8),
}
EPOCHS = 3  # 16 images at batch 8: 2 steps per epoch


class Cut(Exception):
    """Stands in for the process being killed."""


@pytest.fixture(scope="module")
def digits(mnist):
    return mnist.images[:16]


def tiny(name: str, checkpoint: Checkpoint | None = None, **over):
    det = al.create(name, **{**TINY[name], "epochs": EPOCHS, **over})
    det.progress = False
    det.checkpoint = checkpoint
    return det


def state(det) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, net in det._nets().items() for k, v in net.state_dict().items()}


def assert_same(a, b) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.history_ == b.history_


@pytest.mark.parametrize("name", sorted(TINY))
def test_a_cut_run_resumed_ends_where_the_uncut_run_ends(name, digits, tmp_path):
    reference = tiny(name).fit(digits)
    ckpt = Checkpoint(tmp_path / "train.pt", every_s=0)  # written at every epoch end
    steps = []

    def killed_at_step_5(logs):  # step 5 is the first of epoch 3: epochs 1-2 are in the file
        steps.append(logs)
        if len(steps) == 5:
            raise Cut

    cut = tiny(name, ckpt)
    cut.on_step = killed_at_step_5
    with pytest.raises(Cut):
        cut.fit(digits)
    assert ckpt.path.is_file()

    resumed = tiny(name, Checkpoint(ckpt.path, every_s=0))
    resumed_steps = []
    resumed.on_step = resumed_steps.append
    resumed.fit(digits)
    assert resumed.checkpoint.resumed_epochs == 2
    assert len(resumed_steps) == 2  # only epoch 3 trained again
    assert_same(resumed, reference)
    # negative control: the weights the cut run had reached are not the final ones
    assert any(not torch.equal(v, state(reference)[k]) for k, v in state(cut).items() if v.is_floating_point())
    assert np.allclose(reference.score(digits[:4]).numpy(), resumed.score(digits[:4]).numpy(), rtol=0, atol=0)


def test_writing_checkpoints_changes_nothing_and_a_finished_one_trains_nothing(digits, tmp_path):
    reference = tiny("egbad").fit(digits)
    path = tmp_path / "train.pt"
    written = tiny("egbad", Checkpoint(path, every_s=0)).fit(digits)
    assert_same(written, reference)
    again = tiny("egbad", Checkpoint(path))
    steps = []
    again.on_step = steps.append
    again.fit(digits)
    assert steps == [] and again.checkpoint.resumed_epochs == EPOCHS
    assert again.checkpoint.elapsed_before_s > 0
    assert_same(again, reference)


def test_a_checkpoint_of_other_settings_or_images_is_refused(digits, tmp_path):
    path = tmp_path / "train.pt"
    tiny("conv_ae", Checkpoint(path)).fit(digits)
    with pytest.raises(LoadError, match="differs in params"):
        tiny("conv_ae", Checkpoint(path), lr=1e-4).fit(digits)
    with pytest.raises(LoadError, match="differs in data_abs_sum, data_sum"):
        tiny("conv_ae", Checkpoint(path)).fit(digits.flip(-1) * 0.5)
    with pytest.raises(LoadError, match=r"differs in .*detector"):
        tiny("egbad", Checkpoint(path)).fit(digits)
    assert path.is_file()  # refused, never deleted


def test_a_truncated_checkpoint_is_a_load_error_naming_it(digits, tmp_path):
    path = tmp_path / "train.pt"
    tiny("conv_ae", Checkpoint(path)).fit(digits)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LoadError, match="train.pt is not a readable training checkpoint"):
        tiny("conv_ae", Checkpoint(path)).fit(digits)
