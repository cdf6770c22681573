"""Sample-quality metrics for generative models, computed on feature vectors (e.g. Inception pools).

Everything here is plain math on (N, D) feature sets; extracting the features is the caller's job.
Statistics are accumulated in float64: FID and KID subtract large, nearly equal quantities, and
float32 round-off there is of the same order as the differences between good models.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be an (N, D) feature array, got shape {x.shape}")
    return x


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update
    Rule Converge to a Local Nash Equilibrium"): the 2-Wasserstein distance between Gaussians
    fitted to each set, ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}).

    S_a S_b is not symmetric, so `scipy.linalg.sqrtm` on it goes through a Schur decomposition
    that can return complex parts or NaNs when the covariances are rank-deficient (N < D, or dead
    feature channels). Only the trace is needed, and (S_a S_b)^{1/2} is similar to the symmetric
    PSD matrix (S_a^{1/2} S_b S_a^{1/2})^{1/2}, so the trace is the sum of square roots of the
    latter's eigenvalues: two symmetric eigendecompositions, with round-off negatives clipped to 0.
    """
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need >= 2 samples of equal dimension, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = sqrt_a @ cov_b @ sqrt_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3."""
    d, m = x.shape[1], len(x)
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    # The unbiased estimator drops the diagonals k(x_i, x_i): they pair a sample with itself.
    same = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(same - 2.0 * k_xy.mean())


def kernel_inception_distance(
    a: np.ndarray, b: np.ndarray, subsets: int = 10, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased
    MMD^2 between the sets under a cubic polynomial kernel, as (mean, std) over random subsets.

    Unlike FID it assumes no Gaussian shape and its estimator is unbiased, so it is comparable
    across sample sizes and can be (slightly) negative for matching distributions. Subsets keep
    the kernel matrices O(subset_size^2); the std over them says how much to trust the mean.
    """
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape} vs {b.shape}")
    n = min(subset_size, len(a), len(b))
    if n < 2:
        raise ValueError(f"KID needs subsets of >= 2 samples, got {n}")
    rng = np.random.default_rng(seed)
    scores = [
        _mmd2_unbiased(a[rng.choice(len(a), n, replace=False)], b[rng.choice(len(b), n, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(scores)), float(np.std(scores))


def _distance_blocks(
    queries: torch.Tensor, refs: torch.Tensor, chunk: int
) -> Iterator[torch.Tensor]:
    """Euclidean distances from `queries` to all `refs`, in float64 blocks of at most `chunk`
    query rows, so N x M never has to be in memory at once (10k x 10k x 8 B is 800 MB)."""
    q = torch.as_tensor(queries, dtype=torch.float64)
    r = torch.as_tensor(refs, dtype=torch.float64, device=q.device)
    for start in range(0, len(q), chunk):
        yield torch.cdist(q[start : start + chunk], r)


def nearest_neighbours(
    queries: torch.Tensor, refs: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query: the Euclidean distance to its nearest ref (float64) and that ref's index."""
    dists, index = zip(*(block.min(dim=1) for block in _distance_blocks(queries, refs, chunk)))
    return torch.cat(dists), torch.cat(index)


def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each sample to its k-th nearest other sample: the radius of its hypersphere.
    Column 0 of the sorted distances is the sample itself (distance 0), so the k-th other is k."""
    return torch.cat(
        [block.topk(k + 1, dim=1, largest=False).values[:, k] for block in _distance_blocks(x, x, chunk)]
    )


def _inside_manifold(
    points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Whether each point lies in the union of the balls B(centre_i, radius_i)."""
    return torch.cat([(block <= radii).any(dim=1) for block in _distance_blocks(points, centres, chunk)])


def precision_recall(
    real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray, k: int = 3, chunk: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall
    Metric for Assessing Generative Models").

    Each set's manifold is approximated by the union of balls around its samples, each reaching
    the sample's k-th nearest neighbour. Precision is the fraction of fake samples inside the real
    manifold (are samples realistic?); recall the fraction of real samples inside the fake
    manifold (is the data covered?). Separating the two tells mode collapse (high precision, low
    recall) from blurry or off-manifold samples (low precision), which a single FID number mixes.

    Membership needs every ball, not just the nearest centre's: a farther sample with a larger
    radius can contain a point its nearest neighbour's ball misses, so it is checked blockwise.
    """
    real = torch.as_tensor(real, dtype=torch.float64)
    fake = torch.as_tensor(fake, dtype=torch.float64, device=real.device)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} samples per set, got {len(real)} real, {len(fake)} fake")
    real_radii = _kth_neighbour_radii(real, k, chunk)
    fake_radii = _kth_neighbour_radii(fake, k, chunk)
    precision = _inside_manifold(fake, real, real_radii, chunk).double().mean().item()
    recall = _inside_manifold(real, fake, fake_radii, chunk).double().mean().item()
    return precision, recall
