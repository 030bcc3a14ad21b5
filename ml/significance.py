"""Significance tests for comparing forecasters whose labels overlap.

Neighbouring rows of one symbol share h - 1 bars of their h-bar label windows, so their losses
are serially dependent, and rows of different symbols on the same day are correlated. Naive
i.i.d. tests would overstate significance. Every test here accounts for that:

- `diebold_mariano`: HAC (Newey-West) variance with at least horizon - 1 lags and the
  Harvey-Leybourne-Newbold small-sample correction (statsmodels' implementation), on one time
  series per comparison (a panel is averaged over symbols per timestamp first).
- `model_confidence_set`: Hansen-Lunde-Nason MCS (arch's implementation) with a moving-block
  bootstrap whose blocks are the caller's `block` (>= the horizon) long.
- `block_bootstrap_ci`: moving-block bootstrap interval of a mean whose blocks stay inside one
  group (symbol).
- `non_overlapping`: the subsample of every horizon-th row per symbol, whose labels share no bar.
- `compare`: DM test and bootstrap interval of one model against each baseline.

Inputs are per-row losses (see `ml.metrics.PRIMARY_LOSS`); lower is better.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from arch.bootstrap import MCS
from statsmodels.tsa.stattools import diebold_mariano_test


def _losses(name: str, x: np.ndarray) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of per-row losses; got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(
            f"{name} has {int((~np.isfinite(a)).sum())} NaN or infinite losses; drop the rows "
            "without a label before comparing"
        )
    return a


def per_timestamp(ts: np.ndarray | pl.Series, *columns: np.ndarray) -> list[np.ndarray]:
    """Mean of each column over the rows sharing a timestamp, in increasing time order."""
    t = np.asarray(ts)
    if t.ndim != 1 or t.shape[0] != columns[0].shape[0]:
        raise ValueError(
            f"ts must have one timestamp per row ({columns[0].shape[0]}); got shape {t.shape}"
        )
    _, inverse, counts = np.unique(t, return_inverse=True, return_counts=True)
    return [np.bincount(inverse, weights=c) / counts for c in columns]


def diebold_mariano(
    loss_a: np.ndarray,
    loss_b: np.ndarray,
    horizon: int,
    ts: np.ndarray | pl.Series | None = None,
    *,
    lags: int | None = None,
) -> dict[str, float | int]:
    """Diebold-Mariano test of equal expected loss of forecasters A and B.

    loss_a, loss_b: per-row losses on the same rows. horizon: the label window in bars; it sets
    the HAC lags (default max(2 (horizon - 1), ceil(n ** (1/3))), overridable with `lags`) and the
    Harvey et al. (1997) correction, after which the statistic is compared to a Student t with
    n - 1 degrees of freedom (statsmodels' `diebold_mariano_test`, harvey_adj=True).

    ts: for a panel (several symbols, rows in any order), the timestamp of each row. The loss
    differential is then averaged over the rows sharing a timestamp and the test runs on that
    single series in time order. Why: HAC lags are only meaningful along time; a panel stacked
    symbol after symbol would treat the last row of one symbol and the first of the next as
    neighbours, and rows of different symbols on the same day, which are strongly correlated
    (one market move), would be counted as independent evidence. The daily cross-sectional mean
    keeps all the information about the mean and leaves dependence that HAC handles. Without
    ts the rows must already be one time series in time order.

    Returns stat, p_value (two-sided), mean_diff (mean of A's loss minus B's over the tested
    series: negative means A has the lower loss), lags and n (length of the tested series).
    A differential that is constant (e.g. identical forecasts) has no variance: stat 0 and
    p_value 1 when it is 0, +-inf and p_value 0 otherwise.
    """
    a, b = _losses("loss_a", loss_a), _losses("loss_b", loss_b)
    if a.shape != b.shape:
        raise ValueError(f"loss_a and loss_b must cover the same rows; got {a.shape}, {b.shape}")
    if not isinstance(horizon, int | np.integer) or horizon < 1:
        raise ValueError(f"horizon must be a positive number of bars; got {horizon!r}")
    if lags is not None and lags < 0:
        raise ValueError(f"lags must be >= 0; got {lags}")
    if ts is not None:
        a, b = per_timestamp(ts, a, b)
    n = a.size
    # The Harvey factor is sqrt((n - h)(n - h + 1) / n^2): it needs more points than the horizon.
    if n <= horizon:
        raise ValueError(
            f"{n} {'timestamps' if ts is not None else 'rows'} is too few for horizon {horizon}: "
            "the test needs more points than the horizon; score a longer span"
        )
    d = a - b
    mean_diff = float(d.mean())
    # The Bartlett kernel down-weights the autocovariances it includes, so horizon - 1 lags
    # under-count an overlap of horizon - 1 bars: measured here on equally good forecasters with
    # 10-bar overlaps, 9-10% rejections at a nominal 5% with horizon - 1 lags, about 6.5% with
    # twice that. Hence 2 x (horizon - 1), still "at least horizon - 1".
    default = max(2 * (horizon - 1), np.ceil(n ** (1 / 3)))
    used_lags = int(default) if lags is None else int(lags)
    if np.ptp(d) == 0:
        stat = 0.0 if mean_diff == 0 else float(np.sign(mean_diff) * np.inf)
        p_value = 1.0 if mean_diff == 0 else 0.0
    else:
        res = diebold_mariano_test(
            np.zeros(n),
            a,
            b,
            lags=used_lags,
            criterion=lambda _y, loss: loss,  # the "forecasts" are the losses themselves
            harvey_adj=True,
            horizon=int(horizon),
        )
        stat, p_value = float(res.statistic), float(res.pvalue)
    return {"stat": stat, "p_value": p_value, "mean_diff": mean_diff, "lags": used_lags, "n": n}


def model_confidence_set(
    losses: dict[str, np.ndarray],
    alpha: float = 0.10,
    *,
    block: int,
    reps: int = 1000,
    seed: int = 0,
    ts: np.ndarray | pl.Series | None = None,
) -> dict[str, object]:
    """Hansen-Lunde-Nason Model Confidence Set of the forecasters in `losses` (name -> per-row
    losses on the same rows), at level 1 - alpha.

    Uses `arch.bootstrap.MCS` with method "R": each pair of forecasters is standardised by the
    bootstrap variance of its own loss difference, which is what matters here because all
    forecasters score the same rows and their losses are strongly correlated; pairwise
    differencing cancels that shared noise, while "max" compares each model to the set's average.
    The bootstrap is the moving-block one with blocks exactly `block` time steps long (give at
    least the label horizon; the stationary bootstrap's random block lengths would often be
    shorter). With `ts`, losses are averaged over the rows sharing a timestamp first, as in
    `diebold_mariano`.

    Degenerate inputs: forecasters with identical losses cannot be ranked against each other,
    and arch fails on them, so each group of identical columns is tested once and every member
    gets the group's p-value (all in or all out). When every forecaster has the same losses,
    all are included with p-value 1. A pair whose losses differ by a constant is ordered with
    certainty (the worse one gets p-value 0 at its elimination step).

    Returns included (names with p-value > alpha, in the order of `losses`), pvalues (name ->
    MCS p-value: the largest alpha at which the forecaster is still in the set), alpha, block,
    method.
    """
    if len(losses) < 2:
        raise ValueError(f"losses must hold at least two forecasters; got {list(losses)}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    names = list(losses)
    cols = [_losses(f"losses[{n!r}]", losses[n]) for n in names]
    if len({c.shape for c in cols}) > 1:
        shapes = {n: c.shape for n, c in zip(names, cols, strict=True)}
        raise ValueError(f"every forecaster's losses must cover the same rows; got {shapes}")
    if ts is not None:
        cols = per_timestamp(ts, *cols)
    t = cols[0].size
    if not isinstance(block, int | np.integer) or not 1 <= block <= t:
        raise ValueError(f"block must be an integer in 1..{t} (the series length); got {block!r}")
    # One representative per group of identical columns.
    rep_of: list[int] = []
    reps_idx: list[int] = []
    for i, c in enumerate(cols):
        match = next((r for r in reps_idx if np.array_equal(cols[r], c)), None)
        if match is None:
            reps_idx.append(i)
            match = i
        rep_of.append(match)
    if len(reps_idx) == 1:
        rep_p = {reps_idx[0]: 1.0}
    else:
        # a plain array, not a DataFrame: arch maps its result back through the frame's columns
        # with an index array that can come out float (then pandas refuses it), seen on a
        # one-fold demo; positions are mapped back here instead
        frame = np.column_stack([cols[r] for r in reps_idx])
        mcs = MCS(
            frame, alpha, reps=reps, block_size=int(block), method="R", bootstrap="mbb", seed=seed
        )
        # A constant loss difference has zero bootstrap variance: arch divides by it and
        # ranks the pair with certainty (inf statistic), which is the right answer.
        with np.errstate(divide="ignore", invalid="ignore"):
            mcs.compute()
        rep_p = {reps_idx[int(k)]: float(v) for k, v in mcs.pvalues["Pvalue"].items()}
    pvalues = {n: rep_p[rep_of[i]] for i, n in enumerate(names)}
    return {
        "included": [n for n in names if pvalues[n] > alpha],
        "pvalues": pvalues,
        "alpha": alpha,
        "block": int(block),
        "method": "R",
    }


def block_bootstrap_ci(
    diff: np.ndarray,
    block: int,
    groups: np.ndarray | pl.Series | None = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval (low, high) for the mean of `diff` from a moving-block bootstrap.

    Used for per-row loss differences between a model and a baseline: overlapping label windows
    make neighbouring rows dependent, so rows are resampled in blocks of `block` consecutive
    rows (give at least the horizon). With `groups` (e.g. the symbol of each row), blocks never
    straddle two groups: each group is rebuilt to its own length from blocks drawn inside it
    (block length clipped to the group's length), and the bootstrap mean is taken over all
    rebuilt groups, so each group keeps its weight. Rows of each group must be in time order
    (their order in `diff` is kept); groups need not be contiguous.
    """
    x = _losses("diff", diff)
    if not isinstance(block, int | np.integer) or block < 1:
        raise ValueError(f"block must be a positive number of rows; got {block!r}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    if groups is None:
        parts = [x]
    else:
        g = np.asarray(groups)
        if g.shape != x.shape:
            raise ValueError(f"groups must have one label per row ({x.size}); got {g.shape}")
        _, inverse = np.unique(g, return_inverse=True)
        parts = [x[inverse == k] for k in range(inverse.max() + 1)]
    rng = np.random.default_rng(seed)
    totals = np.zeros(n_boot)
    for part in parts:
        totals += _resampled_sums(part, min(int(block), part.size), n_boot, rng)
    means = totals / x.size
    tail = (1.0 - level) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


def _resampled_sums(x: np.ndarray, block: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Sums of n_boot moving-block resamples of x, each rebuilt to len(x) rows: ceil(n / block)
    blocks starting uniformly in 0..n - block, the last one cut to what is left."""
    n = x.size
    n_blocks = -(-n // block)
    tail = n - (n_blocks - 1) * block  # rows kept from the last block
    csum = np.concatenate([[0.0], np.cumsum(x)])
    starts = rng.integers(0, n - block + 1, size=(n_boot, n_blocks))
    full = csum[starts[:, :-1] + block] - csum[starts[:, :-1]]
    last = csum[starts[:, -1] + tail] - csum[starts[:, -1]]
    return full.sum(axis=1) + last


def non_overlapping_mask(
    frame: pl.DataFrame, horizon: int, by: str = "symbol", ts: str = "ts"
) -> np.ndarray:
    """Boolean mask over the rows of `frame` (in its order) that keeps, per `by` group taken in
    `ts` order, the first row and then every horizon-th row. Kept rows of one symbol are
    `horizon` rows apart, so their h-bar label windows (bars t+1..t+h) share no bar when the rows
    are consecutive bars; where rows are missing (purged, unlabelled) they are further apart in
    time, never closer. Raises ValueError on duplicate (by, ts) pairs or nulls in them."""
    if not isinstance(horizon, int | np.integer) or horizon < 1:
        raise ValueError(f"horizon must be a positive number of bars; got {horizon!r}")
    missing = [c for c in (by, ts) if c not in frame.columns]
    if missing:
        raise ValueError(f"frame has no column(s) {missing}; columns are {frame.columns}")
    keys = frame.select(by, ts)
    if keys.null_count().sum_horizontal().item() > 0:
        raise ValueError(f"frame has nulls in {by!r} or {ts!r}; drop those rows first")
    if keys.is_duplicated().any():
        raise ValueError(f"frame has duplicate ({by}, {ts}) rows; each bar must appear once")
    row, k = "__row", "__k"
    kept = (
        keys.with_row_index(row)
        .sort(by, ts)
        .with_columns(pl.int_range(pl.len()).over(by).alias(k))
        .filter(pl.col(k) % int(horizon) == 0)[row]
        .to_numpy()
    )
    mask = np.zeros(frame.height, dtype=bool)
    mask[kept] = True
    return mask


def non_overlapping(
    frame: pl.DataFrame, horizon: int, by: str = "symbol", ts: str = "ts"
) -> pl.DataFrame:
    """The rows of `frame` selected by `non_overlapping_mask` (every horizon-th row per symbol),
    in the frame's order: the subsample on which h-bar labels do not overlap."""
    return frame.filter(pl.Series(non_overlapping_mask(frame, horizon, by, ts)))


def compare(
    losses: dict[str, np.ndarray],
    model: str,
    baselines: list[str],
    horizon: int,
    ts: np.ndarray | pl.Series,
    symbols: np.ndarray | pl.Series,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> pl.DataFrame:
    """One row per baseline comparing `model` to it on the same panel rows (`ts`, `symbols`
    per row, any order).

    Both tests work on one series: the loss differential averaged over the rows sharing a
    timestamp, in time order (symbols on the same date are correlated; a bootstrap that
    resampled each symbol on its own would treat them as independent and give intervals far
    too narrow). `horizon` is the label window in timestamps of that series (for business-day
    symbols on a calendar that has every day, the calendar span of their h bars).

    Returns mean_diff (mean of that series; negative favours the model), row_mean_diff (mean
    over rows), ci_low / ci_high (moving-block bootstrap of the series' mean, blocks of
    `horizon` consecutive timestamps, so a block covers every symbol on those dates and never
    joins one symbol's series to another's), dm_stat, dm_p_value, dm_lags, dm_n
    (`diebold_mariano` on the same series) and model_better (the interval lies below 0)."""
    unknown = [n for n in [model, *baselines] if n not in losses]
    if unknown:
        raise ValueError(f"no losses for {unknown}; known forecasters are {list(losses)}")
    t, s = np.asarray(ts), np.asarray(symbols)
    n = np.asarray(losses[model]).shape[0]
    if t.shape != (n,) or s.shape != (n,):
        raise ValueError(
            f"ts and symbols must have one entry per row ({n}); got {t.shape}, {s.shape}"
        )
    rows = []
    for base in baselines:
        dm = diebold_mariano(losses[model], losses[base], horizon, ts=t)
        diff = _losses(f"losses[{model!r}]", losses[model]) - _losses(
            f"losses[{base!r}]", losses[base]
        )
        (series,) = per_timestamp(t, diff)
        lo, hi = block_bootstrap_ci(
            series, block=min(horizon, series.size), n_boot=n_boot, level=level, seed=seed
        )
        rows.append(
            {
                "model": model,
                "baseline": base,
                "mean_diff": float(series.mean()),
                "row_mean_diff": float(diff.mean()),
                "ci_low": lo,
                "ci_high": hi,
                "dm_stat": dm["stat"],
                "dm_p_value": dm["p_value"],
                "dm_lags": dm["lags"],
                "dm_n": dm["n"],
                "model_better": hi < 0,
            }
        )
    return pl.DataFrame(rows)
