"""One training contract for every epoch-trained detector: train_more, optimizers_, on_step, and the
continual strategies each detector takes (or refuses, saying why)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import anomalab as al
from anomalab.continual import ContinualLearner, StrategyError
from anomalab.data.transforms import prepare
from anomalab.detector import Generative, Trainable
from anomalab.detectors._gan import to_signed
from anomalab.train.epochs import SingleLoss

N_PER_TASK = 16
BATCH = 8
TINY: dict[str, dict] = {
    "conv_ae": dict(latent_dim=8, epochs=1, batch_size=BATCH),
    "vae": dict(latent_dim=8, epochs=1, batch_size=BATCH),
    "anogan": dict(latent_dim=8, width=8, epochs=1, batch_size=BATCH, n_steps=2),
    "egbad": dict(latent_dim=8, epochs=1, batch_size=BATCH),
    "ganomaly": dict(latent_dim=8, width=8, epochs=1, batch_size=BATCH),
    "skip_ganomaly": dict(width=8, epochs=1, batch_size=BATCH),
}
STRATEGIES = ("finetune", "joint", "ewc", "replay")
SUPPORTED = {
    "conv_ae": {"finetune", "joint", "ewc"},
    "vae": {"finetune", "joint", "ewc", "replay"},
    "anogan": {"finetune", "joint", "replay"},
    "egbad": {"finetune", "joint"},
    "ganomaly": {"finetune", "joint"},
    "skip_ganomaly": {"finetune", "joint"},
}
# the reason each refusal gives
REFUSAL = {"ewc": "has no such loss: its step trains networks against each other",
           "replay": "offers no prior to sample from"}
OPTIMIZERS = {"conv_ae": {"model"}, "vae": {"model"}, "anogan": {"g", "d"}, "egbad": {"e", "g", "d"},
              "ganomaly": {"g", "d"}, "skip_ganomaly": {"g", "d"}}


@pytest.fixture(scope="module")
def tasks(mnist):
    """Two tasks of 16 real 28x28 digits: 1s, then 2s."""
    return [mnist.subset(np.flatnonzero(mnist.classes.numpy() == d)[:N_PER_TASK]) for d in (1, 2)]


def tiny(name: str):
    det = al.create(name, **TINY[name])
    det.progress = False
    return det


def weights(det) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}
            for n, net in det._nets().items()}


def test_the_trainable_detectors_are_exactly_these():
    trainable = sorted(n for n in al.list_detectors() if isinstance(al.create(n), Trainable))
    assert trainable == sorted(TINY)
    for name in TINY:
        assert set(al.create(name).continual_strategies) == SUPPORTED[name], name


def test_train_more_has_one_signature_everywhere():
    sigs = {name: inspect.signature(type(al.create(name)).train_more) for name in TINY}
    expected = [("self", "POSITIONAL_OR_KEYWORD"), ("x", "POSITIONAL_OR_KEYWORD"),
                ("epochs", "POSITIONAL_OR_KEYWORD"), ("step", "KEYWORD_ONLY"), ("desc", "KEYWORD_ONLY"),
                ("on_step", "KEYWORD_ONLY")]
    for name, sig in sigs.items():
        assert [(p.name, p.kind.name) for p in sig.parameters.values()] == expected, name
        assert all(p.default is None for p in list(sig.parameters.values())[2:]), name
    assert len(set(map(str, sigs.values()))) == 1


def test_statements_match_what_each_strategy_needs():
    """ewc needs one loss (SingleLoss); replay needs a prior to decode from (prior_decoder)."""
    for name in TINY:
        det = al.create(name)
        assert ("ewc" in det.continual_strategies) == isinstance(det, SingleLoss), name
        decodes = isinstance(det, Generative) and hasattr(det, "prior_decoder")
        assert ("replay" in det.continual_strategies) == decodes, name
    assert not hasattr(al.create("ganomaly"), "loss")  # no loss that no strategy uses


@pytest.mark.parametrize("name", sorted(TINY))
def test_on_step_is_called_after_every_optimiser_step_with_its_logs(name, mnist):
    images = mnist.images[:20]  # 3 batches of 8, 8, 4 per epoch
    det = tiny(name)
    det.epochs = 2
    logged: list[dict] = []
    det.on_step = logged.append
    det.fit(images)
    assert len(logged) == 2 * 3
    for epoch, means in enumerate(det.history_):  # the history is the per-epoch mean of these logs
        part = logged[3 * epoch : 3 * epoch + 3]
        assert set(means) == set(part[0])
        for k, v in means.items():
            assert v == pytest.approx(sum(float(p[k]) for p in part) / 3), (name, k)

    assert set(det.optimizers_) == OPTIMIZERS[name]
    counts = dict.fromkeys(det.optimizers_, 0)
    for key, opt in det.optimizers_.items():
        opt.register_step_post_hook(lambda *_, key=key: counts.__setitem__(key, counts[key] + 1))
    seen: list[dict] = []

    def on_step(logs):  # every optimiser has stepped once more than at the previous call
        assert all(c == len(seen) + 1 for c in counts.values()), counts
        seen.append(logs)

    first = dict(det.optimizers_)
    det.train_more(prepare(images, det.input_shape_), epochs=1, on_step=on_step)
    assert len(seen) == 3 and len(logged) == 6  # the argument replaces the attribute for this call
    assert all(det.optimizers_[k] is first[k] for k in first)  # optimisers persist between calls
    det.reset_optimizers()
    assert det.optimizers_ is None
    det.train_more(prepare(images[:8], det.input_shape_), epochs=1, on_step=lambda logs: None)
    assert set(det.optimizers_) == OPTIMIZERS[name] and all(det.optimizers_[k] is not first[k] for k in first)


def test_on_step_collects_what_wrapping_the_train_step_collected(mnist):
    """gan_mnist's loss curves: on_step records the same per-step logs as replacing _train_step did."""
    images = mnist.images[:16]
    new, old = tiny("ganomaly"), tiny("ganomaly")
    by_callback: list[dict] = []
    new.on_step = by_callback.append
    new.fit(images)
    by_wrapper: list[dict] = []
    step = old._train_step
    old._train_step = lambda b: by_wrapper.append(step(b)) or by_wrapper[-1]
    old.fit(images)
    assert len(by_callback) == 2 and by_callback == by_wrapper


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", sorted(TINY))
def test_two_task_update_works_or_is_refused_with_a_reason(name, strategy, tasks):
    if strategy not in SUPPORTED[name]:
        with pytest.raises(StrategyError, match=f"'{name}' {REFUSAL[strategy]}") as refused:
            ContinualLearner(tiny(name), strategy)
        assert f"'{name}' supports {', '.join(sorted(SUPPORTED[name], key=STRATEGIES.index))}" in str(refused.value)
        return
    params = {"fisher_samples": 4} if strategy == "ewc" else {}
    det = tiny(name)
    learner = ContinualLearner(det, strategy, **params).learn(tasks[0])
    before, first = weights(det), dict(det.optimizers_)
    logs: list[dict] = []
    det.on_step = logs.append
    learner.learn(tasks[1])
    assert learner.tasks_seen == 2
    assert len(logs) == (2 * N_PER_TASK if strategy == "joint" else N_PER_TASK) // BATCH
    assert all(det.optimizers_[k] is not first[k] for k in first)  # fresh optimisers for the task
    after = weights(det)
    for net, state in before.items():
        assert any(not torch.equal(v, after[net][k]) for k, v in state.items()), (name, strategy, net)
    assert torch.isfinite(det.score(tasks[1].images)).all()
    assert torch.isfinite(det.score(tasks[0].images)).all()
    if strategy == "ewc":
        assert all("penalty" in step for step in logs)
        assert logs[0]["penalty"] == 0.0 and logs[-1]["penalty"] > 0.0  # the anchor is the task-1 weights
        assert det.history_[-1]["penalty"] > 0.0


def rows_in(rows: torch.Tensor, pool: torch.Tensor) -> bool:
    d = (rows.flatten(1)[:, None] - pool.flatten(1)[None]).abs().amax(-1)
    return bool((d.min(1).values < 1e-6).all())


def test_anogan_replay_feeds_its_step_decoded_samples_of_a_frozen_generator(tasks):
    det = tiny("anogan")
    learner = ContinualLearner(det, "replay").learn(tasks[0])
    before = {k: v.clone() for k, v in det.generator_.state_dict().items()}
    seen, step = [], det._train_step

    def recording(batch):
        seen.append(batch.detach().clone())
        return step(batch)

    det._train_step = recording
    learner.learn(tasks[1])
    frozen = learner.strategy.decoder
    for k, v in frozen.state_dict().items():  # G at the end of task 1, unchanged by task 2
        assert torch.equal(v, before[k]), k
    real_pool = to_signed(prepare(tasks[1].images, det.input_shape_))
    n_replay = BATCH // 2
    g = torch.Generator().manual_seed(det.seed * 1000 + 1)
    assert len(seen) == N_PER_TASK // BATCH
    for batch in seen:
        real, replayed = batch[:-n_replay], batch[-n_replay:]
        assert len(real) == BATCH and rows_in(real, real_pool)
        with torch.no_grad():
            expected = frozen(torch.randn(n_replay, det.latent_dim, generator=g))
        torch.testing.assert_close(replayed, expected)  # in [-1, 1], as the step's real images


def test_moments_take_their_parameters_layout_before_a_fused_step():
    """torch's fused CPU Adam pairs a parameter with its moments in memory order: moments in another layout
    (loaded from a file while the net trains in channels_last) give a wrong step unless re-laid out."""
    from anomalab.train.epochs import match_state_layout

    def run(align: bool, fused: bool = True) -> torch.Tensor:
        p = torch.nn.Parameter(torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0)))
        p.data = p.data.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.Adam([p], lr=0.1, fused=fused)
        p.grad = (torch.arange(48.0).view(4, 3, 2, 2) / 10).contiguous(memory_format=torch.channels_last)
        opt.step()
        for k in ("exp_avg", "exp_avg_sq"):  # as if saved and loaded: the default layout
            opt.state[p][k] = opt.state[p][k].contiguous()
        if align:
            match_state_layout([opt])
            assert all(opt.state[p][k].stride() == p.stride() for k in ("exp_avg", "exp_avg_sq"))
        p.grad = (torch.arange(48.0).view(4, 3, 2, 2).flip(0) / 7).contiguous(memory_format=torch.channels_last)
        opt.step()
        return p.detach().contiguous()

    reference = run(align=False, fused=False)  # the per-element loop is layout-safe
    torch.testing.assert_close(run(align=True), reference)
    assert not torch.allclose(run(align=False), reference, atol=1e-4)  # the bug this guards against
