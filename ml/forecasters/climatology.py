"""The climatology baseline: every scored row of a symbol gets the same numbers, the symbol's
training-row statistics of each label.

- direction: the training class frequencies, Laplace-smoothed (one pseudo-count per class);
- quantiles: the training empirical quantiles (numpy's linear interpolation) of the quantile
  label (`fwd_ret_90`);
- sigma: the root mean square of the training sigma labels (`fwd_vol_30`): the constant with the
  lowest mean QLIKE, which the volatility forecasts are ranked by;
- returns: the training mean of each `fwd_ret_h`.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ml.baselines import climatology as class_frequencies
from ml.forecasters.base import (
    ALL_TARGETS,
    DIRECTION_COLUMNS,
    FoldData,
    Forecaster,
    TargetSpec,
    register,
)
from ml.forecasters.stats_common import fit_per_symbol, on_scored


def _statistics(rows: pl.DataFrame, spec: TargetSpec) -> dict[str, float]:
    probs = class_frequencies(rows[spec.direction].to_numpy(), 1, len(DIRECTION_COLUMNS))[0]
    quantiles = np.quantile(rows[spec.quantile].to_numpy(), spec.quantile_levels)
    return {
        **dict(zip(DIRECTION_COLUMNS, probs.tolist(), strict=True)),
        **dict(zip(spec.quantile_columns, quantiles.tolist(), strict=True)),
        "sigma": float((rows[spec.sigma] ** 2).mean() ** 0.5),
        **{
            spec.return_column(h): float(rows[spec.return_label(h)].mean())
            for h in spec.return_horizons
        },
    }


@register
class Climatology(Forecaster):
    name = "climatology"
    targets = ALL_TARGETS

    def __init__(self) -> None:
        self.statistics: dict[str, dict[str, float]] = {}

    def fit(self, data: FoldData) -> Climatology:
        """Each symbol's training statistics (all training rows' for a symbol with too few)."""
        spec = data.targets
        self.statistics = fit_per_symbol(
            data, spec.label_columns(), lambda rows: _statistics(rows, spec)
        )
        return self

    def predict(self, data: FoldData) -> pl.DataFrame:
        """Every scored row gets its symbol's training statistics."""
        frame = pl.DataFrame([{"symbol": s, **v} for s, v in self.statistics.items()])
        return on_scored(data, frame, [c for c in frame.columns if c != "symbol"])
