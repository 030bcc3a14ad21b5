"""The RiskMetrics EWMA volatility baseline; nothing is fitted.

Over each symbol's one-bar log returns r_1, r_2, ... (r_i = log(close_i / close_{i-1})):

    s2_n = sample variance (ddof=1) of r_1 .. r_n          (the seed, n = `seed_returns` = 30)
    s2_t = lam * s2_{t-1} + (1 - lam) * r_t^2              (t > n, lam = 0.94)

s2_t uses bars up to t and is the variance forecast for every one of the next W bars (EWMA's
forecast is flat), so sigma at t = sqrt(s2_t). The quantiles are those of the driftless normal
random walk with that sigma: q = z_level * sigma * sqrt(H).
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
from scipy.signal import lfilter

from ml.forecasters.base import QUANTILES, SIGMA, FoldData, Forecaster, register
from ml.forecasters.stats_common import LOG_RETURN, bar_series, normal_quantiles, on_scored


def ewma_variance(returns: np.ndarray, lam: float = 0.94, seed_returns: int = 30) -> np.ndarray:
    """s2_t for each return (NaN for the first `seed_returns` - 1, which precede the seed)."""
    r = np.asarray(returns, dtype=float)
    out = np.full(r.shape, np.nan)
    if r.size < seed_returns:
        return out
    seed = np.var(r[:seed_returns], ddof=1)
    # the recursion y_t = lam y_{t-1} + (1 - lam) x_t as a first-order IIR filter started at seed
    tail, _ = lfilter([1.0 - lam], [1.0, -lam], r[seed_returns:] ** 2, zi=[lam * seed])
    out[seed_returns - 1] = seed
    out[seed_returns:] = tail
    return out


@register
class Ewma(Forecaster):
    name = "ewma"
    targets = (SIGMA, QUANTILES)

    def __init__(self, lam: float = 0.94, seed_returns: int = 30) -> None:
        if not 0.0 < lam < 1.0 or seed_returns < 2:
            raise ValueError(
                f"lam={lam}, seed_returns={seed_returns}: use 0 < lam < 1 and seed_returns >= 2"
            )
        self.lam = lam
        self.seed_returns = seed_returns

    def fit(self, data: FoldData) -> Ewma:
        """Nothing to fit: the decay is RiskMetrics' fixed 0.94."""
        return self

    def sigma(self, data: FoldData) -> pl.DataFrame:
        """Per bar: `sigma` = sqrt(s2_t), null before the seed."""
        parts = []
        for part in bar_series(data, r=LOG_RETURN).partition_by("symbol", maintain_order=True):
            var = np.full(part.height, np.nan)
            # a symbol's first bar has no return
            var[1:] = ewma_variance(part["r"].to_numpy()[1:], self.lam, self.seed_returns)
            parts.append(part.select("symbol", "ts", sigma=pl.Series(np.sqrt(var)).fill_nan(None)))
        return pl.concat(parts)

    def log_sigma(self, data: FoldData) -> pl.DataFrame:
        """Per bar with a positive `sigma`: `log_sigma`, the volatility level the sequence
        models and LightGBM's sigma booster build on (past returns only)."""
        sigma = self.sigma(data).filter(pl.col("sigma") > 0)
        return sigma.select("symbol", "ts", log_sigma=pl.col("sigma").log())

    def predict(self, data: FoldData) -> pl.DataFrame:
        """sigma = sqrt(s2_t); q = z_level sigma sqrt(H)."""
        spec = data.targets
        frame = on_scored(data, self.sigma(data), ["sigma"])
        sd = frame["sigma"].to_numpy() * math.sqrt(spec.horizon(QUANTILES))
        return frame.with_columns(
            **{k: pl.Series(v) for k, v in normal_quantiles(np.zeros_like(sd), sd, spec).items()}
        )
