"""The random-walk baseline: log prices follow a driftless normal random walk, so every return
forecast is 0 and the H-bar return is N(0, sigma_train^2 H).

sigma_train is the symbol's training daily volatility: the sample std of `fwd_ret_1` over its
training rows (one-bar returns whose bars all lie before fit_end). The direction classes use
the label's own thresholds (`TargetSpec.up_threshold` / `down_threshold`).
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from ml.forecasters.base import DIRECTION, QUANTILES, RETURNS, FoldData, Forecaster, register
from ml.forecasters.stats_common import (
    fit_per_symbol,
    label_config,
    normal_direction,
    normal_quantiles,
    on_scored,
)


@register
class ZeroReturn(Forecaster):
    name = "zero_return"
    targets = (DIRECTION, QUANTILES, RETURNS)

    def __init__(self) -> None:
        self.sigma: dict[str, float] = {}

    def fit(self, data: FoldData) -> ZeroReturn:
        """sigma_train per symbol from its training rows' one-bar returns."""
        self.sigma = fit_per_symbol(
            data, ["fwd_ret_1"], lambda rows: float(rows["fwd_ret_1"].std(ddof=1))
        )
        return self

    def predict(self, data: FoldData) -> pl.DataFrame:
        """ret_h = 0; q = z_level sigma_train sqrt(H); p_* = the classes' normal probabilities,
        with H the direction and quantile horizon."""
        spec = data.targets
        symbols = list(self.sigma)
        sd = math.sqrt(spec.horizon(DIRECTION)) * np.array([self.sigma[s] for s in symbols])
        zero = np.zeros_like(sd)
        columns = {
            **normal_direction(zero, sd, label_config(spec)),
            **normal_quantiles(zero, sd, spec),
            **{spec.return_column(h): zero for h in spec.return_horizons},
        }
        return on_scored(data, pl.DataFrame({"symbol": symbols, **columns}), list(columns))
