import numpy as np
import pytest
import torch

from anomalab.metrics.disentangle import EncodedPool, factor_correspondence, factor_vae_score, global_variances


class FactorImages:
    """A toy dataset whose 'image' is its factor vector (N, K, 1, 1), so encoders are easy to write."""

    factor_sizes = (3, 6, 10, 8)

    def images_from_factors(self, factors):
        return torch.as_tensor(np.asarray(factors), dtype=torch.float32)[:, :, None, None]


def perfect(images):  # the factors themselves, rescaled, permuted, plus small noise and one dead dim
    f = images[:, :, 0, 0].numpy()
    noise = np.random.default_rng(len(f)).normal(0, 0.01, f.shape)
    z = (f / np.array([3, 6, 10, 8]) + noise)[:, [2, 0, 3, 1]]
    return np.concatenate([z, np.full((len(f), 1), 0.01)], axis=1)


def random_code(images):
    return np.random.default_rng(int(images.sum()) + len(images)).normal(size=(len(images), 4))


QUICK = dict(batch_size=32, num_train=300, num_eval=200, num_variance_estimate=2000)


def test_perfect_representation_scores_one():
    r = factor_vae_score(perfect, FactorImages(), np.random.default_rng(0), **QUICK)
    assert r.eval_accuracy > 0.98 and r.train_accuracy > 0.98
    assert r.num_active_dims == 4  # the constant dim is pruned (std < 0.05)
    assert r.classifier[:4].tolist() == [2, 0, 3, 1]
    assert r.votes[:, 4].sum() == 0  # a pruned dim is never voted for
    assert r.votes.sum() == QUICK["num_eval"]


def test_random_representation_scores_near_chance():
    r = factor_vae_score(random_code, FactorImages(), np.random.default_rng(0), **QUICK)
    assert r.eval_accuracy < 0.45  # chance with 4 factors is 0.25 plus the majority vote's small bias


def test_all_dims_pruned_scores_zero():
    r = factor_vae_score(lambda x: np.zeros((len(x), 3)), FactorImages(), np.random.default_rng(0), **QUICK)
    assert r.eval_accuracy == 0.0 and r.num_active_dims == 0


def test_correspondence():
    data, rng = FactorImages(), np.random.default_rng(1)
    var = global_variances(perfect, data, rng, 2000)
    assert factor_correspondence(perfect, data, rng, factor=3, dim=2, variances=var, batch_size=32) == 1.0
    assert factor_correspondence(perfect, data, rng, factor=3, dim=0, variances=var, batch_size=32) == 0.0
    assert factor_correspondence(perfect, data, rng, factor=0, dim=4, variances=var, batch_size=32) == 0.0
    share = factor_correspondence(random_code, data, rng, factor=1, dim=0, num_votes=200, batch_size=32)
    assert share == pytest.approx(0.25, abs=0.12)


def test_pooled_votes_agree_with_exact_sampling():
    data = FactorImages()
    r = factor_vae_score(perfect, data, np.random.default_rng(0), pool_size=3000, **QUICK)
    assert r.eval_accuracy > 0.98 and r.classifier[:4].tolist() == [2, 0, 3, 1]
    r = factor_vae_score(random_code, data, np.random.default_rng(0), pool_size=3000, **QUICK)
    assert r.eval_accuracy < 0.45
    pool = EncodedPool.build(perfect, data, np.random.default_rng(2), 3000)
    assert factor_correspondence(perfect, data, np.random.default_rng(3), factor=3, dim=2, pool=pool,
                                 num_variance_estimate=2000, batch_size=32) == 1.0
