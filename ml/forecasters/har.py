"""The HAR volatility baseline (Corsi's heterogeneous autoregression) on a range-based daily
variance.

Each bar's variance is Parkinson's range estimator RV_t = (ln(H_t / L_t))^2 / (4 ln 2). The
regressors at t are RV_t, its mean over the last 5 bars and over the last 22 (bars up to t
only); the target is the realized variance of the next W bars, `fwd_vol_W`^2. Per symbol, a
direct OLS on its training rows

    fwd_vol_W^2 = b0 + b_d RV_t + b_w mean(RV_{t-4..t}) + b_m mean(RV_{t-21..t}) + e

and sigma = sqrt(forecast), floored at the sqrt of the 1st percentile of the positive training targets.

Levels, not logs: bars with no range (H == L, a stale quote; DXY's early years have thousands)
have RV = 0, which a log regression cannot take, while OLS in levels takes them and the floor
keeps the forecasts positive. Per symbol, not pooled: the ratio of a bar's range to its
close-to-close variation (overnight gaps, trading hours) differs by market, and per-symbol
slopes absorb it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from ml.forecasters.base import SIGMA, FoldData, Forecaster, register
from ml.forecasters.stats_common import bar_series, fit_per_symbol, fitted, on_scored

REGRESSORS = ("rv_d", "rv_w", "rv_m")
FLOOR_QUANTILE = 0.01


def parkinson_variance() -> pl.Expr:
    """(ln(high / low))^2 / (4 ln 2): a bar's variance from its range."""
    return (pl.col("high") / pl.col("low")).log() ** 2 / (4.0 * math.log(2.0))


@dataclass(frozen=True)
class HarFit:
    coef: np.ndarray  # b0, b_d, b_w, b_m
    floor: float  # on the variance forecast

    def variance(self, x: np.ndarray) -> np.ndarray:
        """The floored variance forecasts for regressor rows `x` (rv_d, rv_w, rv_m)."""
        return np.maximum(self.coef[0] + x @ self.coef[1:], self.floor)


@register
class Har(Forecaster):
    name = "har"
    targets = (SIGMA,)

    def __init__(self, weekly: int = 5, monthly: int = 22) -> None:
        if not 1 < weekly < monthly:
            raise ValueError(f"weekly={weekly}, monthly={monthly}: use 1 < weekly < monthly")
        self.weekly = weekly
        self.monthly = monthly
        self.fits: dict[str, HarFit] = {}

    def regressors(self, data: FoldData) -> pl.DataFrame:
        """Per bar: rv_d, rv_w, rv_m (null until `monthly` bars exist)."""
        rv = parkinson_variance()
        return bar_series(
            data,
            rv_d=rv,
            rv_w=rv.rolling_mean(self.weekly),
            rv_m=rv.rolling_mean(self.monthly),
        )

    def fit(self, data: FoldData) -> Har:
        """OLS of each symbol's training targets on its regressors."""
        label = data.targets.sigma
        train = data.train.select(["symbol", "ts", label]).join(
            self.regressors(data), on=["symbol", "ts"], how="left"
        )

        def ols(rows: pl.DataFrame) -> HarFit:
            y = rows[label].to_numpy() ** 2
            x = np.column_stack([np.ones(rows.height), rows.select(REGRESSORS).to_numpy()])
            coef, *_ = np.linalg.lstsq(x, y, rcond=None)
            # positive targets only: a stale stretch (zero variance) must not floor at zero
            positive = y[y > 0]
            floor = float(np.quantile(positive, FLOOR_QUANTILE)) if positive.size else 0.0
            return HarFit(coef, floor)

        self.fits = fit_per_symbol(data, [label, *REGRESSORS], ols, train=train)
        return self

    def predict(self, data: FoldData) -> pl.DataFrame:
        """sigma = sqrt of each scored row's floored HAR forecast."""
        frame = on_scored(data, self.regressors(data), list(REGRESSORS))
        x = frame.select(REGRESSORS).to_numpy()
        symbols = frame["symbol"].to_numpy()
        var = np.empty(frame.height)
        for symbol in frame["symbol"].unique(maintain_order=True):
            idx = np.flatnonzero(symbols == symbol)
            var[idx] = fitted(self.fits, symbol).variance(x[idx])
        return frame.select("symbol", "ts", sigma=pl.Series(np.sqrt(var)))
