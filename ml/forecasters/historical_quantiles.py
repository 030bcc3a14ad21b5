"""Rolling historical quantiles: the quantiles of the next H-bar log return are the empirical
quantiles (numpy's linear interpolation) of the symbol's past H-bar log returns.

At bar t the sample is log(close_s / close_{s-H}) for the bars s in the trailing `window`
(s = t - window + 1 .. t): returns whose windows have ended by t, so the value at t uses bars up
to t only. Where fewer than `min_samples` such returns exist (a symbol's first bars), the row
gets the symbol's training-row quantiles of the label instead (all training rows' for a symbol
with too few).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ml.forecasters.base import QUANTILES, FoldData, Forecaster, register
from ml.forecasters.stats_common import bar_series, fit_per_symbol, on_scored


@register
class HistoricalQuantiles(Forecaster):
    name = "historical_quantiles"
    targets = (QUANTILES,)

    def __init__(self, window: int = 730, min_samples: int = 90) -> None:
        if not 2 <= min_samples <= window:
            raise ValueError(
                f"min_samples={min_samples}, window={window}: use 2 <= min_samples <= window"
            )
        self.window = window
        self.min_samples = min_samples
        self.fallback: dict[str, list[float]] = {}

    def fit(self, data: FoldData) -> HistoricalQuantiles:
        """The training-row quantiles each symbol falls back on during its warm-up."""
        spec = data.targets
        self.fallback = fit_per_symbol(
            data,
            [spec.quantile],
            lambda rows: np.quantile(rows[spec.quantile].to_numpy(), spec.quantile_levels).tolist(),
        )
        return self

    def quantiles(self, data: FoldData) -> pl.DataFrame:
        """Per bar: the rolling quantile columns, null until `min_samples` returns exist."""
        spec = data.targets
        past = pl.col("close").log().diff(spec.horizon(QUANTILES))
        return bar_series(
            data,
            **{
                col: past.rolling_quantile(
                    level, "linear", window_size=self.window, min_samples=self.min_samples
                )
                for col, level in zip(spec.quantile_columns, spec.quantile_levels, strict=True)
            },
        )

    def predict(self, data: FoldData) -> pl.DataFrame:
        """The rolling quantiles at each scored row, the training quantiles during warm-up."""
        columns = list(data.targets.quantile_columns)
        fallback = pl.DataFrame(
            [{"symbol": s, **dict(zip(columns, q, strict=True))} for s, q in self.fallback.items()]
        )
        frame = (
            self.quantiles(data)
            .join(fallback, on="symbol", how="left", suffix="_fallback")
            .select(
                "symbol",
                "ts",
                *[pl.col(c).fill_null(pl.col(f"{c}_fallback")) for c in columns],
            )
        )
        return on_scored(data, frame, columns)
