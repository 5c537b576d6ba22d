"""K-Means in numpy: greedy k-means++ seeding, Lloyd iterations, `n_init` restarts.

Follows scikit-learn's `KMeans(algorithm="lloyd")` semantics and defaults (n_init "auto", one k-means++ run
since scikit-learn 1.4; max_iter 300): `tol` is relative to the mean
per-feature variance of the data and bounds the squared shift of all centers between iterations;
k-means++ is the greedy variant (2 + log k candidate centers per step, keep the one that lowers
the potential most); a cluster left empty is moved to the point farthest from its center.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm


@dataclass
class KMeansResult:
    labels: np.ndarray  # (N,) int64, cluster of each point
    centers: np.ndarray  # (k, D), same dtype as the input
    inertia: float  # sum of squared distances of points to their centers
    n_iter: int  # Lloyd iterations of the best run


def kmeans(
    X: np.ndarray,
    k: int,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
) -> KMeansResult:
    """Cluster the rows of `X` (N, D) into `k` clusters; the run with the lowest inertia wins."""
    X = _check_input(X, k)
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be >= 1, got {n_init} and {max_iter}")
    tol_abs = float(np.mean(np.var(X, axis=0))) * tol
    x_sq = np.einsum("ij,ij->i", X, X)  # (N,)
    rng = np.random.default_rng(seed)
    best = None
    for _ in tqdm(range(n_init), desc="k-means", disable=not progress):
        centers = kmeans_plusplus(X, k, rng, x_sq)
        result = _lloyd(X, centers, x_sq, max_iter, tol_abs)
        if best is None or result.inertia < best.inertia:
            best = result
    return best


def kmeans_plusplus(X: np.ndarray, k: int, rng: np.random.Generator, x_sq: np.ndarray | None = None) -> np.ndarray:
    """Greedy k-means++ seeding -> (k, D) centers chosen among the rows of `X`."""
    n = X.shape[0]
    x_sq = np.einsum("ij,ij->i", X, X) if x_sq is None else x_sq
    n_trials = 2 + int(math.log(k))
    chosen = [int(rng.integers(n))]
    closest = _sq_dist(X, X[chosen], x_sq)[:, 0]  # (N,)
    potential = closest.sum(dtype=np.float64)
    for _ in range(1, k):
        cum = np.cumsum(closest, dtype=np.float64)
        candidates = np.searchsorted(cum, rng.random(n_trials) * potential, side="right")
        candidates = np.minimum(candidates, n - 1)
        dist = np.minimum(closest[:, None], _sq_dist(X, X[candidates], x_sq))  # (N, n_trials)
        totals = dist.sum(axis=0, dtype=np.float64)
        best = int(np.argmin(totals))
        chosen.append(int(candidates[best]))
        closest, potential = dist[:, best], totals[best]
    return X[chosen].copy()


def assign(X: np.ndarray, centers: np.ndarray, x_sq: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest center of every row -> (labels (N,), squared distances (N,))."""
    x_sq = np.einsum("ij,ij->i", X, X) if x_sq is None else x_sq
    dist = _sq_dist(X, centers, x_sq)  # (N, k)
    labels = dist.argmin(axis=1)
    return labels, dist[np.arange(len(X)), labels]


def _lloyd(X: np.ndarray, centers: np.ndarray, x_sq: np.ndarray, max_iter: int, tol_abs: float) -> KMeansResult:
    k = centers.shape[0]
    labels = None
    for it in range(1, max_iter + 1):  # noqa: B007 - `it` is the iteration count, returned after the loop
        new_labels, dist = assign(X, centers, x_sq)
        new_centers = _update_centers(X, new_labels, dist, k)
        shift = float(((new_centers - centers) ** 2).sum())
        converged = labels is not None and np.array_equal(new_labels, labels)
        centers, labels = new_centers, new_labels
        if converged or shift <= tol_abs:
            break
    labels, dist = assign(X, centers, x_sq)  # labels consistent with the final centers
    return KMeansResult(labels.astype(np.int64), centers, float(dist.sum(dtype=np.float64)), it)


def _update_centers(X: np.ndarray, labels: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    counts = np.bincount(labels, minlength=k)
    one_hot = np.zeros((k, len(X)), dtype=X.dtype)
    one_hot[labels, np.arange(len(X))] = 1
    centers = one_hot @ X  # (k, D) per-cluster sums
    empty = np.flatnonzero(counts == 0)
    if empty.size:  # move each empty cluster onto one of the points farthest from their centers
        far = np.argsort(-dist, kind="stable")[: empty.size]
        centers[empty] = X[far]
        counts[empty] = 1
        for i in far:
            if counts[labels[i]] > 1:
                centers[labels[i]] -= X[i]
                counts[labels[i]] -= 1
    return centers / counts[:, None].astype(X.dtype)


def _sq_dist(X: np.ndarray, C: np.ndarray, x_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (N, M) = |x|^2 - 2 x.c + |c|^2, clipped at 0."""
    d = x_sq[:, None] - 2.0 * (X @ C.T) + np.einsum("ij,ij->i", C, C)[None, :]
    return np.maximum(d, 0, out=d)


def _check_input(X: np.ndarray, k: int) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"k-means expects a 2-D array (n_points, dim), got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        X = X.astype(np.float64)
    if not np.isfinite(X).all():
        rows = np.flatnonzero(~np.isfinite(X).all(axis=1))
        raise ValueError(f"k-means input has NaN/inf values in rows {rows[:10].tolist()} (of {len(X)})")
    if not 1 <= k <= len(X):
        raise ValueError(f"k must be between 1 and the number of points ({len(X)}), got k={k}")
    return np.ascontiguousarray(X)
