"""Forecast metrics, one implementation used for every model and baseline."""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.int64)
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probabilities must be (n, classes) with n = {y.shape[0]}; got {p.shape}")
    if y.size == 0:
        raise ValueError("no rows to score")
    return y, p


def accuracy(y: np.ndarray, p: np.ndarray) -> float:
    y, p = _check(y, p)
    return float(np.mean(p.argmax(1) == y))


def balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    y, p = _check(y, p)
    pred = p.argmax(1)
    recalls = [np.mean(pred[y == k] == k) for k in np.unique(y)]
    return float(np.mean(recalls))


def macro_f1(y: np.ndarray, p: np.ndarray) -> float:
    y, p = _check(y, p)
    pred = p.argmax(1)
    f1s = []
    for k in range(p.shape[1]):
        tp = np.sum((pred == k) & (y == k))
        fp = np.sum((pred == k) & (y != k))
        fn = np.sum((pred != k) & (y == k))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def log_loss_per_row(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    y, p = _check(y, p)
    p = np.clip(p, EPS, 1.0)
    p = p / p.sum(1, keepdims=True)
    return -np.log(p[np.arange(len(y)), y])


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(log_loss_per_row(y, p)))


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of the squared distance to the one-hot outcome."""
    y, p = _check(y, p)
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


CLASSIFICATION_METRICS = {
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "macro_f1": macro_f1,
    "log_loss": log_loss,
    "brier": brier,
}


def classification_report(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    return {name: fn(y, p) for name, fn in CLASSIFICATION_METRICS.items()}


def block_bootstrap_ci(
    diff: np.ndarray, block: int, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Moving-block bootstrap interval for the mean of a serially correlated series.

    Used for per-row loss differences between a model and a baseline: overlapping forward
    windows make neighbouring rows dependent, so rows are resampled in blocks.
    """
    diff = np.asarray(diff, dtype=np.float64)
    n = diff.size
    if n == 0:
        raise ValueError("no rows to bootstrap")
    block = max(1, min(block, n))
    rng = np.random.default_rng(seed)
    n_blocks = int(np.ceil(n / block))
    starts = rng.integers(0, n - block + 1, size=(n_boot, n_blocks))
    idx = (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(n_boot, -1)[:, :n]
    means = diff[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
