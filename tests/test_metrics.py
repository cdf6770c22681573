"""gannet.trainer.evaluation.metrics against independent reference implementations and known-answer cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from gannet.trainer.evaluation.metrics import (
    frechet_distance,
    kernel_inception_distance,
    nearest_neighbours,
    precision_recall,
)


def _gaussian(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated, non-isotropic covariance
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d)


def _fid_pytorch_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The classic pytorch-fid formula: scipy sqrtm of the (non-symmetric) product."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_matches_pytorch_fid_formula() -> None:
    rng = np.random.default_rng(0)
    a, b = _gaussian(rng, 2000, 64), _gaussian(rng, 2000, 64)
    ours, ref = frechet_distance(a, b), _fid_pytorch_fid(a, b)
    assert ref > 1.0  # the two Gaussians really differ, so the comparison means something
    assert ours == pytest.approx(ref, abs=1e-3)


def test_fid_is_zero_against_itself_and_large_when_shifted() -> None:
    rng = np.random.default_rng(1)
    a = _gaussian(rng, 2000, 64)
    assert abs(frechet_distance(a, a)) < 1e-6
    # A mean shift of 5 in each of 64 dims alone contributes 64 * 25 = 1600.
    assert frechet_distance(a, a + 5.0) == pytest.approx(1600.0, rel=1e-6)


def test_fid_is_finite_for_rank_deficient_covariances() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(20, 64))  # N < D: singular covariances
    fid = frechet_distance(a, b)
    assert np.isfinite(fid) and fid > 0


def _kid_naive(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 written as the textbook double sums over i != j."""
    d, m = x.shape[1], len(x)

    def k(u, v):
        return (float(u @ v) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_naive_double_loop() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 8)), rng.normal(0.5, 1.2, size=(30, 8))
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=30)
    assert mean == pytest.approx(_kid_naive(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted() -> None:
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(1000, 32)), rng.normal(size=(1000, 32))
    same_mean, _ = kernel_inception_distance(a, b, subsets=5, subset_size=500)
    shifted_mean, shifted_std = kernel_inception_distance(a, b + 1.0, subsets=5, subset_size=500)
    assert abs(same_mean) < 0.01
    assert shifted_mean > 0.5 and shifted_mean > 10 * shifted_std
    # subset_size larger than either set is capped, not an error.
    assert np.isfinite(kernel_inception_distance(a[:50], b[:80], subsets=2)[0])


def _two_clusters(gen: torch.Generator, n: int, d: int = 8) -> torch.Tensor:
    points = torch.randn(n, d, generator=gen)
    points[: n // 2, 0] += 20.0
    return points


# Low dimension on purpose: with k=3 and 1000 samples, k-NN balls of a 16-D Gaussian already miss
# ~20% of a second sample from it (the estimator's known small-k bias), which tests nothing here.
def test_precision_recall_identical_distributions() -> None:
    gen = torch.Generator().manual_seed(5)
    real, fake = torch.randn(1000, 8, generator=gen), torch.randn(1000, 8, generator=gen)
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.8 and recall > 0.8


def test_precision_recall_mode_collapse() -> None:
    gen = torch.Generator().manual_seed(6)
    real = _two_clusters(gen, 1000)
    fake = torch.randn(1000, 8, generator=gen)  # only the cluster at the origin
    precision, recall = precision_recall(real, fake, k=3)
    assert precision > 0.8
    assert 0.4 < recall < 0.6


def test_precision_recall_far_away_fake() -> None:
    gen = torch.Generator().manual_seed(7)
    real = torch.randn(500, 8, generator=gen)
    fake = torch.randn(500, 8, generator=gen) + 50.0
    assert precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_accepts_numpy_and_small_chunks() -> None:
    gen = torch.Generator().manual_seed(8)
    real, fake = _two_clusters(gen, 300), torch.randn(300, 8, generator=gen)
    whole = precision_recall(real, fake, k=3)
    assert precision_recall(real.numpy(), fake.numpy(), k=3, chunk=7) == whole


def test_nearest_neighbours_matches_brute_force_across_chunks() -> None:
    gen = torch.Generator().manual_seed(9)
    queries, refs = torch.randn(103, 5, generator=gen), torch.randn(61, 5, generator=gen)
    brute = ((queries[:, None, :] - refs[None, :, :]) ** 2).sum(-1).double().sqrt()
    for chunk in (1, 10, 1024):
        dist, index = nearest_neighbours(queries, refs, chunk=chunk)
        assert index.tolist() == brute.argmin(dim=1).tolist()
        torch.testing.assert_close(dist, brute.min(dim=1).values, rtol=1e-6, atol=1e-6)


def test_precision_recall_known_answer_in_one_dimension() -> None:
    # k=2 radii of the real points 0, 1, 3, 6, 10 are 3, 2, 3, 4, 7, so the real manifold is
    # [-3, 17]: of the fakes only -2 and 15 are inside. (k=1 radii would give [-1, 14], k=3
    # [-6, 19]; either off-by-one changes the answer.) The fake balls cover every real point.
    real = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    fake = torch.tensor([[-2.0], [15.0], [18.0], [-5.0], [100.0]])
    assert precision_recall(real, fake, k=2) == (pytest.approx(0.4), pytest.approx(1.0))
