"""The GARCH(1,1) volatility baseline, fitted with the `arch` package.

Per symbol: a constant-mean GARCH(1,1) with Student-t errors is fitted by maximum likelihood
on the symbol's one-bar log returns (in percent: returns x 100, where arch's optimizer is well
scaled) whose bars lie before fit_end. The variance recursion then runs over the symbol's whole
bar history with those parameters fixed, and the row at t gets

    sigma_t = sqrt(mean over h = 1..W of E_t[sigma^2_{t+h}]) / 100,

the analytic multi-step forecasts made from returns up to t: the std of the next W one-bar
returns that `fwd_vol_W` measures. The recursion starts from arch's backcast of the first
pre-fit_end returns (fitted, like the parameters), so a scored row's value depends on no bar
after it.

A symbol with fewer than `min_fit_returns` returns before fit_end borrows the parameters of one
fit on every symbol's pre-fit_end returns together; its recursion starts from its own first 75
returns (arch's backcast window), which lie inside every feature's warm-up.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl
from arch import arch_model
from arch.univariate.base import ARCHModel

from ml.forecasters.base import SIGMA, FoldData, Forecaster, register
from ml.forecasters.stats_common import LOG_RETURN, bar_series, fitted, on_scored

PERCENT = 100.0
BACKCAST_RETURNS = 75  # arch's GARCH backcast: an exponentially weighted mean of the first 75


def _model(returns: np.ndarray) -> ARCHModel:
    # rescale=False: the x100 scaling is chosen here, so arch must neither rescale nor warn
    return arch_model(returns, mean="Constant", vol="GARCH", p=1, q=1, dist="t", rescale=False)


def _returns(data: FoldData) -> dict[str, tuple[pl.Series, np.ndarray]]:
    """Each symbol's (ts of the bar closing each return, percent log returns), in time order."""
    out = {}
    for part in (
        bar_series(data, r=LOG_RETURN).drop_nulls("r").partition_by("symbol", maintain_order=True)
    ):
        out[part["symbol"][0]] = (part["ts"], PERCENT * part["r"].to_numpy())
    return out


def _n_before(ts: pl.Series, cutoff: datetime) -> int:
    """How many of the sorted `ts` are before `cutoff`."""
    return int(ts.search_sorted(cutoff, side="left"))


@register
class Garch(Forecaster):
    name = "garch"
    targets = (SIGMA,)

    def __init__(self, min_fit_returns: int = 500) -> None:
        self.min_fit_returns = min_fit_returns
        # per symbol: mu, omega, alpha[1], beta[1], nu (the percent-return scale)
        self.params: dict[str, np.ndarray] = {}
        # per fitted series (a symbol, or "pooled"): scipy's SLSQP exit code, 0 = converged.
        # Fits that did not converge are kept, not dropped: the one seen so far (8, "positive
        # directional derivative", on DXY's stale early decades) stopped on the alpha + beta = 1
        # boundary with sensible estimates. Callers can report the flags.
        self.convergence: dict[str, int] = {}

    def _fit(self, returns: np.ndarray, key: str) -> np.ndarray:
        res = _model(returns).fit(disp="off", show_warning=False)
        self.convergence[key] = int(res.convergence_flag)
        return res.params.to_numpy()

    def fit(self, data: FoldData) -> Garch:
        """Each symbol's GARCH parameters from its returns before fit_end."""
        series = _returns(data)
        before = {s: r[: _n_before(ts, data.fit_end)] for s, (ts, r) in series.items()}
        self.params, self.convergence = {}, {}
        pooled: list[np.ndarray] = []  # fitted once, the first time a symbol needs it
        for symbol in data.rows["symbol"].unique(maintain_order=True):
            own = before.get(symbol, np.empty(0))
            if own.size >= self.min_fit_returns:
                self.params[symbol] = self._fit(own, symbol)
                continue
            if not pooled:
                every = np.concatenate(list(before.values()))
                if every.size < self.min_fit_returns:
                    raise ValueError(
                        f"Fold {data.key} has {every.size} returns before fit_end over all "
                        f"symbols; GARCH needs {self.min_fit_returns}: use a longer history or "
                        "a lower min_fit_returns"
                    )
                pooled.append(self._fit(every, "pooled"))
            self.params[symbol] = pooled[0]
        return self

    def sigma(self, data: FoldData) -> pl.DataFrame:
        """Per bar from each scored symbol's first scored row on: `sigma`, the forecast std of
        the next W one-bar returns."""
        horizon = data.targets.sigma_window
        first_scored = data.scored.group_by("symbol", maintain_order=True).agg(pl.col("ts").min())
        series = _returns(data)
        parts = []
        for symbol, start_ts in first_scored.iter_rows():
            ts, r = series[symbol]
            # the recursion's start (backcast and starting mean) comes from the pre-fit_end
            # returns, or from the first 75 where there are hardly any
            sample_end = max(_n_before(ts, data.fit_end), min(BACKCAST_RETURNS, r.size))
            fixed = _model(r).fix(fitted(self.params, symbol), last_obs=sample_end)
            start = _n_before(ts, start_ts)
            var = fixed.forecast(horizon=horizon, start=start, reindex=False).variance
            sigma = np.sqrt(var.to_numpy().mean(axis=1)) / PERCENT
            parts.append(
                pl.DataFrame({"ts": ts.slice(start), "sigma": sigma}).with_columns(
                    symbol=pl.lit(symbol)
                )
            )
        return pl.concat(parts)

    def predict(self, data: FoldData) -> pl.DataFrame:
        """sigma at every scored row."""
        return on_scored(data, self.sigma(data), ["sigma"])
