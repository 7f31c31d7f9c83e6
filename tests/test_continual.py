"""Continual learning: each strategy's mechanism on tiny real digits (replay, EWC, joint, finetune)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomalab.continual import (
    EWC,
    ContinualLearner,
    Replay,
    StrategyError,
    diagonal_fisher,
    ewc_penalty,
    make_strategy,
    mnist_digit_sequence,
)
from anomalab.continual.strategies import trainable_parameters
from anomalab.detectors.conv_ae import ConvAE
from anomalab.detectors.vae import VAE

N_PER_TASK = 16
BATCH = 8


@pytest.fixture(scope="module")
def tasks(mnist):
    """Three tasks of 16 real digits each: 1s, 2s, 3s."""
    return [mnist.subset(np.flatnonzero(mnist.classes.numpy() == d)[:N_PER_TASK]) for d in (1, 2, 3)]


def tiny_vae(seed: int = 0) -> VAE:
    det = VAE(latent_dim=4, epochs=1, batch_size=BATCH, lr=1e-2, seed=seed)
    det.progress = False
    return det


def record_batches(det) -> list[torch.Tensor]:
    """Wrap det.loss to keep a copy of every batch it trains on."""
    seen, loss = [], det.loss

    def recording(batch):
        seen.append(batch.detach().clone())
        return loss(batch)

    det.loss = recording
    return seen


def rows_in(rows: torch.Tensor, pool: torch.Tensor) -> bool:
    """Is every image of `rows` one of the images of `pool`?"""
    d = (rows.flatten(1)[:, None] - pool.flatten(1)[None]).abs().amax(-1)
    return bool((d.min(1).values < 1e-6).all())


def state_copy(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_replay_batches_hold_decoded_samples_of_a_frozen_decoder(tasks):
    det = tiny_vae()
    learner = ContinualLearner(det, "replay").learn(tasks[0])
    before = state_copy(det.decoder_)
    seen = record_batches(det)
    learner.learn(tasks[1])
    frozen = learner.strategy.decoder
    # the frozen copy is the decoder as it was at the end of task 1, and training did not change it
    for k, v in state_copy(frozen).items():
        assert torch.equal(v, before[k]), k
    after = state_copy(det.decoder_)
    assert not any(torch.equal(v, before[k]) for k, v in after.items() if v.is_floating_point())
    # every batch = real images of task 2 + batch/2 images decoded by the frozen decoder from z ~ N(0, I)
    n_replay = BATCH // 2
    g = torch.Generator().manual_seed(det.seed * 1000 + 1)
    assert len(seen) == N_PER_TASK // BATCH
    for batch in seen:
        real, replayed = batch[:-n_replay], batch[-n_replay:]
        assert len(real) == BATCH
        assert rows_in(real, tasks[1].images)
        assert not rows_in(replayed[:1], tasks[1].images)
        z = torch.randn(n_replay, det.latent_dim, generator=g)
        with torch.no_grad():
            expected = frozen(z)
        torch.testing.assert_close(replayed, expected)


def test_first_task_has_nothing_to_replay(tasks):
    det = tiny_vae()
    seen = record_batches(det)
    ContinualLearner(det, "replay").learn(tasks[0])
    assert all(rows_in(b, tasks[0].images) for b in seen)


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_fisher_weighted_distance():
    anchor = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([[0.5]])}
    fisher = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[10.0]])}
    lam = 0.5
    assert ewc_penalty(anchor, anchor, fisher, lam).item() == 0.0
    moved = {"a": anchor["a"] + torch.tensor([0.1, 0.0]), "b": anchor["b"]}
    assert ewc_penalty(moved, anchor, fisher, lam).item() == pytest.approx(lam * 3.0 * 0.1**2)
    further = {"a": anchor["a"] + torch.tensor([0.2, 0.0]), "b": anchor["b"]}
    assert ewc_penalty(further, anchor, fisher, lam).item() == pytest.approx(4 * lam * 3.0 * 0.1**2)
    # a parameter with zero Fisher moves for free; the same move of a high-Fisher one costs more
    free = {"a": anchor["a"] + torch.tensor([0.0, 5.0]), "b": anchor["b"]}
    assert ewc_penalty(free, anchor, fisher, lam).item() == 0.0
    costly = {"a": anchor["a"], "b": anchor["b"] + 0.1}
    assert ewc_penalty(costly, anchor, fisher, lam).item() == pytest.approx(lam * 10.0 * 0.1**2)


def test_diagonal_fisher_is_the_mean_squared_per_image_gradient(tasks):
    det = tiny_vae().fit(tasks[0])
    x = tasks[0].images[:3]
    fisher = diagonal_fisher(det, x, n_samples=3, seed=5)
    params = trainable_parameters(det)
    assert set(fisher) == set(params)
    # independent recomputation: the same three images, one backward each, same posterior noise
    for net in det._nets().values():
        net.eval()
    torch.manual_seed(5)
    order = torch.randperm(3, generator=torch.Generator().manual_seed(5)).tolist()
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    for i in order:
        for p in params.values():
            p.grad = None
        det.loss(x[i : i + 1])[0].backward()
        for k, p in params.items():
            expected[k] += p.grad.pow(2) / 3
    for k in params:
        torch.testing.assert_close(fisher[k], expected[k])
    assert sum(f.sum() for f in fisher.values()) > 0


def test_ewc_starts_each_task_at_zero_penalty_and_holds_parameters_near_the_anchor(tasks):
    distances = {}
    for name, params in (("finetune", {}), ("ewc", {"ewc_lambda": 1e4, "fisher_samples": 8})):
        det = tiny_vae()
        learner = ContinualLearner(det, name, **params).learn(tasks[0])
        anchor = {k: p.detach().clone() for k, p in trainable_parameters(det).items()}
        if name == "ewc":
            learner.strategy.begin_task(det, 1)
            assert learner.strategy.penalty(det).item() == 0.0
        learner.learn(tasks[1])
        if name == "ewc":
            assert learner.strategy.penalty(det).item() > 0.0
            assert det.history_[-1]["penalty"] > 0.0
        fisher = learner.strategy.fisher if name == "ewc" else None
        distances[name] = anchor, {k: p.detach() for k, p in trainable_parameters(det).items()}, fisher
    anchor_f, after_f, _ = distances["finetune"]
    anchor_e, after_e, fisher = distances["ewc"]
    for k in anchor_f:  # same seed, same first task
        torch.testing.assert_close(anchor_f[k], anchor_e[k])
    weighted = {n: sum((fisher[k] * (after[k] - anc[k]).pow(2)).sum() for k in anc)
                for n, (anc, after) in {"finetune": (anchor_f, after_f), "ewc": (anchor_e, after_e)}.items()}
    assert weighted["ewc"] < 0.1 * weighted["finetune"]


def test_joint_trains_on_every_task_so_far_and_finetune_on_the_last_only(tasks):
    for name in ("joint", "finetune"):
        det = tiny_vae()
        learner = ContinualLearner(det, name).learn(tasks[0]).learn(tasks[1])
        seen = record_batches(det)
        learner.learn(tasks[2])
        images = torch.cat(seen)
        expected = torch.cat([t.images for t in tasks]) if name == "joint" else tasks[2].images
        assert len(images) == len(expected)  # one epoch: every image exactly once
        assert rows_in(images, expected) and rows_in(expected, images)


def test_joint_at_equal_steps_makes_fewer_passes_over_a_larger_union():
    assert make_strategy("joint").task_epochs(20, n_new=400, n_train=1200) == 20
    assert make_strategy("joint", equal_steps=True).task_epochs(20, n_new=400, n_train=1200) == 7
    assert make_strategy("joint", equal_steps=True).task_epochs(2, n_new=400, n_train=3600) == 1


def test_inapplicable_strategies_raise_clear_errors(tasks):
    with pytest.raises(StrategyError, match="'conv_ae' offers no prior to sample from"):
        ContinualLearner(ConvAE(latent_dim=4), "replay")
    for name in ("finetune", "ewc", "joint"):  # the others work with conv_ae
        ContinualLearner(ConvAE(latent_dim=4), name)
    from anomalab.detectors.knn import KNN

    with pytest.raises(StrategyError, match="gradient-trained"):
        ContinualLearner(KNN(), "finetune")
    with pytest.raises(StrategyError, match="unknown strategy"):
        make_strategy("distill")


def test_conv_ae_learns_a_sequence_with_ewc(tasks):
    det = ConvAE(latent_dim=4, epochs=1, batch_size=BATCH)
    det.progress = False
    learner = ContinualLearner(det, EWC(ewc_lambda=1.0, fisher_samples=4)).learn(tasks[0]).learn(tasks[1])
    assert learner.tasks_seen == 2
    assert torch.isfinite(det.score(tasks[2].images)).all()


@pytest.mark.parametrize("strategy", ["replay", "ewc"])
def test_saved_learner_continues_exactly_like_the_sequence_in_memory(tasks, tmp_path, strategy):
    params = {"fisher_samples": 8} if strategy == "ewc" else {}
    ref = tiny_vae()
    ContinualLearner(ref, strategy, **params).learn(tasks[0]).learn(tasks[1]).learn(tasks[2])
    det = tiny_vae()
    ContinualLearner(det, strategy, **params).learn(tasks[0]).learn(tasks[1]).save(tmp_path / "run")
    loaded = ContinualLearner.load(tmp_path / "run")
    assert loaded.strategy.name == strategy and loaded.tasks_seen == 2
    loaded.detector.progress = False
    loaded.learn(tasks[2])
    torch.testing.assert_close(loaded.detector.score(tasks[0].images), ref.score(tasks[0].images))


def test_joint_and_fresh_ewc_say_they_need_the_earlier_data(tasks, tmp_path):
    det = tiny_vae().fit(tasks[0])
    det.save(tmp_path / "plain")
    for name in ("joint", "ewc"):
        learner = ContinualLearner.load(tmp_path / "plain", strategy=name)
        assert learner.strategy.needs_earlier_data()
        learner.start_from(tasks[0])
        assert not learner.strategy.needs_earlier_data()
    assert not ContinualLearner.load(tmp_path / "plain", strategy="replay").strategy.needs_earlier_data()
    with pytest.raises(StrategyError, match="name a strategy"):
        ContinualLearner.load(tmp_path / "plain")


def test_mnist_sequence_holds_out_test_images_of_every_digit(mnist):
    seq = mnist_digit_sequence(mnist, seed=3)
    assert seq.names == [str(d) for d in range(1, 10)]
    assert [len(t) for t in seq.tasks] == [400] * 9 and [len(t) for t in seq.tests] == [100] * 9
    assert len(seq.anomalies) == 500 and (seq.anomalies.classes == 0).all()
    for d, train, test in zip(range(1, 10), seq.tasks, seq.tests, strict=True):
        assert (train.classes == d).all() and (test.classes == d).all()
        assert not set(train.names) & set(test.names)
    after3 = seq.test_after(2)
    assert int((after3.labels == 0).sum()) == 300 and int((after3.labels == 1).sum()) == 500
    assert mnist_digit_sequence(mnist, seed=3).tests[0].names == seq.tests[0].names
    assert mnist_digit_sequence(mnist, seed=4).tests[0].names != seq.tests[0].names


def test_replay_strategy_object_reports_its_memory(tasks):
    det = tiny_vae()
    learner = ContinualLearner(det, Replay()).learn(tasks[0]).learn(tasks[1])
    decoder_bytes = sum(v.numel() * v.element_size() for v in det.decoder_.state_dict().values())
    assert learner.memory_bytes == [0, decoder_bytes]
