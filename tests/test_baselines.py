"""knn and pca beyond the contract: embeddings, exact distances, PCA subspace."""

import pytest
import torch

import anomalab


def test_knn_on_pixels_is_the_mean_distance_to_the_k_nearest():
    train = torch.zeros(4, 1, 2, 2)
    train[1] += 0.1
    train[2] += 0.2
    train[3] += 0.9
    det = anomalab.create("knn", k=2).fit(train)
    query = torch.full((1, 1, 2, 2), 0.05)
    # distances to the four images: 0.1, 0.1, 0.3, 1.7 (Euclidean over 4 pixels) -> mean of 2 nearest = 0.1
    assert det.score(query).item() == pytest.approx(0.1, abs=1e-5)


def test_knn_on_a_saved_embedding(tiny_case, tmp_path):
    train, test = tiny_case
    vae = anomalab.create("vae", latent_dim=8, epochs=10, batch_size=16, lr=1e-2).fit(train)
    vae.save(tmp_path / "vae")
    det = anomalab.create("knn", k=3, embedder=str(tmp_path / "vae")).fit(train)
    assert det.train_features_.shape == (len(train), 8)
    scores = det.score(test.images)
    det.save(tmp_path / "knn")
    assert torch.equal(anomalab.load(tmp_path / "knn").score(test.images), scores)
    with pytest.raises(NotImplementedError, match="knn"):
        det.score_map(test.images)


def test_pca_reconstructs_images_inside_its_subspace_exactly():
    g = torch.Generator().manual_seed(0)
    basis = torch.rand(2, 16, generator=g)
    train = (torch.rand(30, 2, generator=g) @ basis / 2).view(30, 1, 4, 4)
    det = anomalab.create("pca", n_components=2).fit(train)
    assert det.score(train).max() < 1e-10
    off = train[:3].clone()
    off[:, :, 0, 0] += 0.5
    assert (det.score(off) > 1e-4).all()
