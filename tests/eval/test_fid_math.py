"""FID-stage numerics against float64 brute-force references (no Inception needed)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from sfd_core import fid
from sfd_core.image_grid import make_grid


def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. from the definition, in float64 with explicit differences."""
    real, fake = real.astype(np.float64), fake.astype(np.float64)

    def radii(points):  # distance to the k-th nearest *other* point
        d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]

    def covered(queries, centers, r):
        d = np.sqrt(((queries[:, None] - centers[None]) ** 2).sum(-1))
        return (d <= r[None]).any(axis=1)

    return covered(fake, real, radii(real)).mean(), covered(real, fake, radii(fake)).mean()


@pytest.mark.parametrize("batch_size", [7, 10000])
def test_precision_recall_matches_brute_force(batch_size):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 16)).astype(np.float32)
    fake = (rng.normal(size=(45, 16)) * 1.3 + 0.4).astype(np.float32)  # wider and shifted: P, R strictly in (0, 1)
    precision, recall = fid.precision_recall(real, fake, k=3, batch_size=batch_size)
    ref_precision, ref_recall = brute_force_precision_recall(real, fake, 3)
    assert 0 < precision < 1 and 0 < recall < 1
    assert precision == pytest.approx(ref_precision, abs=1e-12)
    assert recall == pytest.approx(ref_recall, abs=1e-12)


def test_precision_recall_extremes():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(30, 8))
    assert fid.precision_recall(real, real, k=3) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)


def test_running_moments_equal_numpy_cov_in_float64():
    rng = np.random.default_rng(2)
    # A large common offset: naive sum-of-squares in float64 would lose digits here.
    features = (rng.normal(size=(50, 6)) * [1, 2, 3, 4, 5, 6] + 1e4).astype(np.float32)
    moments = fid.RunningMoments(6)
    for chunk in np.array_split(features, 4):
        moments.update(chunk)
    mu, sigma = moments.statistics()
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rank", [48, 5])  # full-rank and rank-deficient (fewer images than dimensions)
def test_frechet_distance_matches_sqrtm_and_torch_fidelity(rank):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 48, rank))
    sigma1, sigma2 = a @ a.T / rank, b @ b.T / rank + 0.1 * np.diag(rng.uniform(size=48))
    mu1, mu2 = rng.normal(size=(2, 48))
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean)
    fidelity = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
        fidelity["frechet_inception_distance"], rel=1e-8)
    # float32 mean (as torch-fidelity caches it) against float64: must not trip its dtype assertion.
    assert fid.frechet_distance(mu1.astype(np.float32), sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-5)


def test_render_report_says_when_standins_were_used():
    metrics = {"fid": 12.3456, "inception_score_mean": 1.5, "inception_score_std": 0.1, "num_samples": 8.0}
    text = fid.render_report(metrics, standins=True, reference_source="adm_npz", k=3, grid_name="grid.png",
                             samples_uri="s", reference_uri="r")
    assert "Stand-in networks were used" in text and "| FID (pool3, vs. reference mu/sigma) | 12.3456 |" in text
    assert "precision/recall are not available" in text and "![samples](grid.png)" in text
    plain = fid.render_report({**metrics, "precision": 0.5, "recall": 0.25}, standins=False,
                              reference_source="imagenet_shards", k=3, grid_name=None, samples_uri="s",
                              reference_uri="r")
    assert "Stand-in" not in plain and "| Precision (k-NN manifold, k=3) | 0.5000 |" in plain


def test_make_grid_places_images_row_major():
    images = np.stack([np.full((2, 3, 3), i, dtype=np.uint8) for i in range(5)])
    grid = make_grid(images, columns=3, padding=1, background=255)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 3)
    assert (grid[1:3, 5:8] == 1).all() and (grid[4:6, 1:4] == 3).all() and (grid[4:6, 9:12] == 255).all()
