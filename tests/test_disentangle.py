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


def merged(images):
    """Factors 0 and 1 exactly, factors 2 and 3 summed into one dimension: fixing factor 2 or factor 3
    both shrink dim 2 the most, the majority vote maps dim 2 to one of them, so the score is 3/4."""
    f = images[:, :, 0, 0].numpy()
    return np.stack([f[:, 0] / 3, f[:, 1] / 6, f[:, 2] / 10 + f[:, 3] / 8], axis=1)


def _vote_shares(r):
    """Each factor's votes as shares over the dims (rows sum to 1)."""
    return r.votes / r.votes.sum(1, keepdims=True)


@pytest.mark.parametrize("encode, expected", [(perfect, 1.0), (merged, 0.75), (random_code, None)])
def test_pooled_votes_agree_with_exact_sampling(encode, expected):
    """The pooled estimate and the exact one (every vote renders and encodes its own images) give the
    same score: within 0.05 of each other and 0.04 of the known true score (1 for the factors themselves,
    3/4 for two factors merged into one dim), and both near chance (1/4) for a random code."""
    data, votes = FactorImages(), {**QUICK, "num_eval": 2000}  # 2000 eval votes: binomial std ~0.01
    exact = factor_vae_score(encode, data, np.random.default_rng(0), **votes)
    pooled = factor_vae_score(encode, data, np.random.default_rng(1), pool_size=3000, **votes)
    assert exact.votes.sum() == pooled.votes.sum() == 2000
    if expected is None:  # negative control: no representation, both near chance
        assert exact.eval_accuracy < 0.45 and pooled.eval_accuracy < 0.45
        assert abs(exact.eval_accuracy - pooled.eval_accuracy) < 0.15
        return
    assert exact.eval_accuracy == pytest.approx(expected, abs=0.04)
    assert pooled.eval_accuracy == pytest.approx(expected, abs=0.04)
    assert abs(exact.eval_accuracy - pooled.eval_accuracy) < 0.05
    assert exact.num_active_dims == pooled.num_active_dims
    # not just the same number: the same factor -> dim voting pattern, share by share
    np.testing.assert_allclose(_vote_shares(pooled), _vote_shares(exact), atol=0.06)
    np.testing.assert_allclose(pooled.global_variances, exact.global_variances, rtol=0.1)


def test_merged_factors_share_one_dimension():
    """The check that makes `merged`'s 3/4 real: factors 2 and 3 both vote for dim 2, and dim 2 is
    mapped to one of them, so the other's votes count as errors."""
    r = factor_vae_score(merged, FactorImages(), np.random.default_rng(0), **QUICK)
    shares = _vote_shares(r)
    assert shares[0, 0] > 0.95 and shares[1, 1] > 0.95
    assert shares[2, 2] > 0.8 and shares[3, 2] > 0.8
    assert r.classifier[:2].tolist() == [0, 1] and r.classifier[2] in (2, 3)


def test_pool_shares_one_encoding_between_calls():
    data = FactorImages()
    calls = []

    def counting(images):
        calls.append(len(images))
        return perfect(images)

    pool = EncodedPool.build(counting, data, np.random.default_rng(2), 3000)
    assert sum(calls) == 3000
    # every vote of the pooled score fixes one factor: its rows really share that factor's value
    k, dims = pool.votes(np.random.default_rng(3), pool.variances(2000), 50, batch_size=32)
    assert (dims[:, None] == np.array([1, 3, 0, 2])[k][:, None]).all()  # perfect permutes [2, 0, 3, 1]
    assert factor_correspondence(counting, data, np.random.default_rng(3), factor=3, dim=2, pool=pool,
                                 num_variance_estimate=2000, batch_size=32) == 1.0
    r = factor_vae_score(counting, data, np.random.default_rng(4), pool=pool, **QUICK)
    assert r.eval_accuracy > 0.98 and sum(calls) == 3000  # the pool was reused: no more encodings
