"""Forecast metrics, one implementation used for every model and baseline.

Per-row losses (`*_per_row`) feed the significance tests in `ml.significance` (Diebold-Mariano,
Model Confidence Set, block bootstrap); the `*_report` functions summarise one target's forecasts
as a dict of floats. `TARGET_METRICS` and `PRIMARY_LOSS` map each forecaster target (see
`ml.forecasters.base`) to its report and to the per-row loss its forecasters are ranked by.

Every function takes numpy-compatible arrays, one entry per scored row, and raises ValueError
naming the argument when a shape does not match or a value is NaN / infinite.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import polars as pl
from scipy import stats

EPS = 1e-12
# QLIKE divides and takes logs of variances: a realized variance of exactly 0 (a window of
# unchanged prices) or a forecast of 0 would give inf. Both are raised to this floor first. It is
# a variance of 1e-12 (a 1-bar sigma of 1e-6), far below any real market's, so it only ever
# changes degenerate rows.
VARIANCE_FLOOR = 1e-12


# ---------------------------------------------------------------------------------------------
# validation


def _vector(name: str, x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one value per row); got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty: no rows to score")
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN or infinite values (first at row "
            f"{int(np.argmax(bad))}); drop the rows whose label or forecast is missing first"
        )
    return a


def _vectors(**arrays: np.ndarray) -> list[np.ndarray]:
    """Validate several per-row vectors and check they all have the same length."""
    out = [_vector(name, a) for name, a in arrays.items()]
    lengths = {name: a.size for name, a in zip(arrays, out, strict=True)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-row arrays must have the same length; got {lengths}")
    return out


def _nonnegative(name: str, a: np.ndarray) -> np.ndarray:
    if (a < 0).any():
        raise ValueError(
            f"{name} has {int((a < 0).sum())} negative values; variances and volatilities "
            "must be >= 0"
        )
    return a


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class labels (n,) in 0..k-1 and probabilities (n, k), both finite."""
    yf = np.asarray(y, dtype=np.float64).reshape(-1)
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != yf.shape[0]:
        raise ValueError(
            f"probabilities must be (n, classes) with n = {yf.shape[0]}; got {p.shape}"
        )
    if yf.size == 0:
        raise ValueError("no rows to score")
    if not np.isfinite(p).all():
        raise ValueError(f"p has {int((~np.isfinite(p)).sum())} NaN or infinite probabilities")
    if not np.isfinite(yf).all() or (yf != np.round(yf)).any():
        raise ValueError("y must be integer class labels without NaN (0=down, 1=flat, 2=up)")
    if yf.min() < 0 or yf.max() >= p.shape[1]:
        raise ValueError(
            f"y has labels outside 0..{p.shape[1] - 1} (got {yf.min():.0f}..{yf.max():.0f}); "
            "p needs one column per class"
        )
    return yf.astype(np.int64), p


def _level(name: str, level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"{name} must be in (0, 1); got {level}")
    return float(level)


# ---------------------------------------------------------------------------------------------
# direction (class probabilities)


def accuracy(y: np.ndarray, p: np.ndarray) -> float:
    """Share of rows whose most probable class is the realized one."""
    y, p = _check(y, p)
    return float(np.mean(p.argmax(1) == y))


def balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    """Mean over the realized classes of the recall of the arg-max prediction."""
    y, p = _check(y, p)
    pred = p.argmax(1)
    recalls = [np.mean(pred[y == k] == k) for k in np.unique(y)]
    return float(np.mean(recalls))


def macro_f1(y: np.ndarray, p: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 of the arg-max prediction (classes never predicted
    nor realized are left out)."""
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
    """-log of the probability given to the realized class (rows renormalised, clipped at EPS)."""
    y, p = _check(y, p)
    p = np.clip(p, EPS, 1.0)
    p = p / p.sum(1, keepdims=True)
    return -np.log(p[np.arange(len(y)), y])


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """Mean of `log_loss_per_row`."""
    return float(np.mean(log_loss_per_row(y, p)))


def brier_per_row(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Multi-class Brier score per row: squared distance of p to the one-hot outcome (0..2)."""
    y, p = _check(y, p)
    onehot = np.eye(p.shape[1])[y]
    return np.sum((p - onehot) ** 2, axis=1)


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of the squared distance to the one-hot outcome."""
    return float(np.mean(brier_per_row(y, p)))


CLASSIFICATION_METRICS = {
    "accuracy": accuracy,
    "balanced_accuracy": balanced_accuracy,
    "macro_f1": macro_f1,
    "log_loss": log_loss,
    "brier": brier,
}


def classification_report(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """Every metric of CLASSIFICATION_METRICS, by name."""
    return {name: fn(y, p) for name, fn in CLASSIFICATION_METRICS.items()}


def direction_report(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """The direction target's report: log_loss, brier, accuracy, balanced_accuracy, macro_f1
    of probabilities p (n, 3: p_down, p_flat, p_up) against labels y in {0, 1, 2}."""
    order = ("log_loss", "brier", "accuracy", "balanced_accuracy", "macro_f1")
    return {name: CLASSIFICATION_METRICS[name](y, p) for name in order}


def _bin_stats(
    y: np.ndarray, p: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per (class, bin): row count, sum of predicted probability, count of realized outcomes."""
    y, p = _check(y, p)
    if not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("p has probabilities outside [0, 1]; calibration bins cover [0, 1]")
    k = p.shape[1]
    # Bins are [j/n, (j+1)/n); a probability of exactly 1 goes into the last bin.
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    flat = bins + n_bins * np.arange(k)[None, :]
    hit = (y[:, None] == np.arange(k)[None, :]).astype(np.float64)
    size = k * n_bins
    count = np.bincount(flat.ravel(), minlength=size).reshape(k, n_bins)
    pred = np.bincount(flat.ravel(), weights=p.ravel(), minlength=size).reshape(k, n_bins)
    obs = np.bincount(flat.ravel(), weights=hit.ravel(), minlength=size).reshape(k, n_bins)
    return count, pred, obs


def reliability_table(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> pl.DataFrame:
    """Reliability diagram data, one row per (class, non-empty probability bin).

    For each class k, rows are put in `n_bins` equal-width bins of their predicted probability
    p[:, k] ([j/n_bins, (j+1)/n_bins), the last bin closed at 1). Returns a polars DataFrame with
    columns class, bin_low, bin_high, mean_predicted (mean of p[:, k] in the bin),
    observed_frequency (share of the bin's rows whose label is k) and count; empty bins are left
    out. A calibrated forecaster has mean_predicted close to observed_frequency in every bin.
    """
    count, pred, obs = _bin_stats(y, p, n_bins)
    k_idx, b_idx = np.nonzero(count)
    n = count[k_idx, b_idx]
    return pl.DataFrame(
        {
            "class": k_idx.astype(np.int64),
            "bin_low": b_idx / n_bins,
            "bin_high": (b_idx + 1) / n_bins,
            "mean_predicted": pred[k_idx, b_idx] / n,
            "observed_frequency": obs[k_idx, b_idx] / n,
            "count": n.astype(np.int64),
        }
    )


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Class-wise expected calibration error (Kull et al. 2019) over the bins of
    `reliability_table`: mean over classes of sum over bins of
    (count / n) * |mean_predicted - observed_frequency|. 0 is perfectly calibrated."""
    count, pred, obs = _bin_stats(y, p, n_bins)
    n_rows, n_classes = count[0].sum(), count.shape[0]
    gap = np.abs(pred - obs)  # = count * |mean_predicted - observed_frequency|
    return float(gap.sum() / (n_rows * n_classes))


# ---------------------------------------------------------------------------------------------
# quantiles of the forward return


def pinball_per_row(y: np.ndarray, q: np.ndarray, level: float) -> np.ndarray:
    """Pinball (quantile) loss of the forecast q of the `level` quantile of y:
    level * (y - q) when y >= q, (1 - level) * (q - y) otherwise."""
    level = _level("level", level)
    y, q = _vectors(y=y, q=q)
    u = y - q
    return np.maximum(level * u, (level - 1.0) * u)


def winkler_per_row(
    y: np.ndarray, lower: np.ndarray, upper: np.ndarray, alpha: float
) -> np.ndarray:
    """Winkler / interval score of the central (1 - alpha) interval [lower, upper]:
    (upper - lower) + 2/alpha * (lower - y) if y < lower, + 2/alpha * (y - upper) if y > upper.
    Raises ValueError where lower > upper."""
    alpha = _level("alpha", alpha)
    y, lower, upper = _vectors(y=y, lower=lower, upper=upper)
    crossed = lower > upper
    if crossed.any():
        raise ValueError(
            f"lower > upper on {int(crossed.sum())} rows (first at row {int(np.argmax(crossed))});"
            " sort each row's quantiles (np.minimum / np.maximum) before scoring the interval"
        )
    below = np.maximum(lower - y, 0.0)
    above = np.maximum(y - upper, 0.0)
    return (upper - lower) + (2.0 / alpha) * (below + above)


def _quantile_name(level: float) -> str:
    # Same naming as TargetSpec.quantile_columns: 0.1 -> q10, 0.9 -> q90.
    return f"q{round(100 * level):02d}"


def _interval_levels(levels: tuple[float, float]) -> tuple[float, float, float]:
    """(low, high, alpha) of a central interval; raises unless low + high == 1."""
    if len(levels) != 2:
        raise ValueError(f"levels must be (low, high); got {levels!r}")
    lo, hi = _level("levels[0]", levels[0]), _level("levels[1]", levels[1])
    if not lo < hi or abs(lo + hi - 1.0) > 1e-9:
        raise ValueError(
            f"levels must be a central interval (low < high, low + high = 1); got {levels!r}"
        )
    return lo, hi, 1.0 - (hi - lo)


def quantile_loss_per_row(
    y: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    levels: tuple[float, float] = (0.1, 0.9),
) -> np.ndarray:
    """Sum of the pinball losses of the two quantile forecasts (the quantiles' primary loss)."""
    lo, hi, _ = _interval_levels(levels)
    return pinball_per_row(y, lower, lo) + pinball_per_row(y, upper, hi)


def quantile_report(
    y: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    levels: tuple[float, float] = (0.1, 0.9),
) -> dict[str, float]:
    """The quantile target's report for forecasts `lower` / `upper` of the `levels` quantiles of
    the realized return y: pinball_q10 and pinball_q90 (names follow the levels), coverage
    (share of rows with lower <= y <= upper; nominal high - low), below_lower, above_upper
    (nominal low and 1 - high) and winkler (mean interval score, alpha = 1 - (high - low))."""
    lo, hi, alpha = _interval_levels(levels)
    y, lower, upper = _vectors(y=y, lower=lower, upper=upper)
    return {
        f"pinball_{_quantile_name(lo)}": float(np.mean(pinball_per_row(y, lower, lo))),
        f"pinball_{_quantile_name(hi)}": float(np.mean(pinball_per_row(y, upper, hi))),
        "coverage": float(np.mean((lower <= y) & (y <= upper))),
        "below_lower": float(np.mean(y < lower)),
        "above_upper": float(np.mean(y > upper)),
        "winkler": float(np.mean(winkler_per_row(y, lower, upper, alpha))),
    }


# ---------------------------------------------------------------------------------------------
# volatility


def qlike_per_row(realized_var: np.ndarray, forecast_var: np.ndarray) -> np.ndarray:
    """QLIKE loss of a variance forecast: rv/fv - log(rv/fv) - 1, 0 when fv == rv and > 0
    otherwise. Both variances are first raised to VARIANCE_FLOOR (1e-12) so that a zero realized
    variance or a zero forecast gives a large finite loss instead of inf."""
    rv, fv = _vectors(realized_var=realized_var, forecast_var=forecast_var)
    _nonnegative("realized_var", rv)
    _nonnegative("forecast_var", fv)
    ratio = np.maximum(rv, VARIANCE_FLOOR) / np.maximum(fv, VARIANCE_FLOOR)
    return ratio - np.log(ratio) - 1.0


def sigma_qlike_per_row(realized_sigma: np.ndarray, forecast_sigma: np.ndarray) -> np.ndarray:
    """QLIKE of volatility forecasts, on the variances (sigma squared): the sigma target's
    primary loss."""
    rs, fs = _vectors(realized_sigma=realized_sigma, forecast_sigma=forecast_sigma)
    _nonnegative("realized_sigma", rs)
    _nonnegative("forecast_sigma", fs)
    return qlike_per_row(rs**2, fs**2)


def sigma_report(realized_sigma: np.ndarray, forecast_sigma: np.ndarray) -> dict[str, float]:
    """The sigma target's report, with rv = realized_sigma**2 and fv = forecast_sigma**2:
    qlike (mean QLIKE), mse_var (mean (rv - fv)**2), the Mincer-Zarnowitz regression
    rv = mz_alpha + mz_beta * fv + e fitted by least squares (unbiased forecasts have alpha 0 and
    beta 1; mz_r2 is its R squared) and rmse_sigma (on the sigmas). mz_* are NaN when the
    forecast is constant (the regression has no slope), mz_r2 also when rv is constant."""
    rs, fs = _vectors(realized_sigma=realized_sigma, forecast_sigma=forecast_sigma)
    rv, fv = _nonnegative("realized_sigma", rs) ** 2, _nonnegative("forecast_sigma", fs) ** 2
    fc, rc = fv - fv.mean(), rv - rv.mean()
    sxx, syy, sxy = float(fc @ fc), float(rc @ rc), float(fc @ rc)
    if sxx > 0:
        beta = sxy / sxx
        alpha = float(rv.mean() - beta * fv.mean())
        r2 = sxy * sxy / (sxx * syy) if syy > 0 else float("nan")
    else:
        alpha = beta = r2 = float("nan")
    return {
        "qlike": float(np.mean(qlike_per_row(rv, fv))),
        "mse_var": float(np.mean((rv - fv) ** 2)),
        "mz_alpha": alpha,
        "mz_beta": beta,
        "mz_r2": r2,
        "rmse_sigma": float(np.sqrt(np.mean((rs - fs) ** 2))),
    }


# ---------------------------------------------------------------------------------------------
# point forecasts of returns


def squared_error_per_row(y: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(y - f) ** 2 per row."""
    y, f = _vectors(y=y, f=f)
    return (y - f) ** 2


def absolute_error_per_row(y: np.ndarray, f: np.ndarray) -> np.ndarray:
    """|y - f| per row (the returns target's primary loss, applied to each horizon)."""
    y, f = _vectors(y=y, f=f)
    return np.abs(y - f)


def returns_report(y: np.ndarray, f: np.ndarray) -> dict[str, float]:
    """The returns target's report for point forecasts f of realized log returns y (one
    horizon): mae, rank_ic (Spearman rank correlation of f and y, pooled over the rows given)
    and hit_rate (share of rows with sign(f) == sign(y) among rows with f != 0; a y of 0 counts
    as a miss). A constant forecast, such as one that always says 0, has no ranking and no
    direction, so its rank_ic is NaN (also when y is constant), and hit_rate is NaN when every
    f is 0: NaN rather than a fake number that would flatter or punish it."""
    y, f = _vectors(y=y, f=f)
    ranked = y.size >= 2 and np.ptp(f) > 0 and np.ptp(y) > 0
    rank_ic = float(stats.spearmanr(f, y).statistic) if ranked else float("nan")
    called = f != 0
    hit = float(np.mean(np.sign(f[called]) == np.sign(y[called]))) if called.any() else np.nan
    return {
        "mae": float(np.mean(np.abs(y - f))),
        "mse": float(np.mean((y - f) ** 2)),
        "rank_ic": rank_ic,
        "hit_rate": float(hit),
    }


# ---------------------------------------------------------------------------------------------
# registries

# Each target's report, called with that target's arrays:
#   direction: (y direction label 0/1/2, p (n, 3) = p_down, p_flat, p_up)
#   quantiles: (y fwd return, lower = q10, upper = q90)
#   sigma:     (realized_sigma = fwd_vol, forecast_sigma = sigma)
#   returns:   (y = fwd_ret_h, f = ret_h), once per horizon h
TARGET_METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "direction": direction_report,
    "quantiles": quantile_report,
    "sigma": sigma_report,
    "returns": returns_report,
}

# The per-row loss each target's forecasters are compared by (Diebold-Mariano, Model Confidence
# Set, bootstrap intervals), called with the same arguments as its TARGET_METRICS entry: all are
# strictly proper / consistent for what the target forecasts (probabilities, quantiles, the
# variance, the mean return: squared error, the loss the return models are fitted with; MAE is
# reported beside it).
PRIMARY_LOSS: dict[str, Callable[..., np.ndarray]] = {
    "direction": log_loss_per_row,
    "quantiles": quantile_loss_per_row,
    "sigma": sigma_qlike_per_row,
    "returns": squared_error_per_row,
}
