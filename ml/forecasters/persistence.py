"""The persistence baseline: what just happened happens again.

- direction: the class of the trailing H-bar return (`log_ret_90`, the label's thresholds)
  through the symbol's training transition frequencies P(next class | trailing class), as
  `ml.baselines.Persistence` does;
- sigma: the trailing realized volatility, the sample std of the last W one-bar log returns
  (`realized_vol_30`);
- returns: ret_h = the last h bars' log return (`log_ret_h`).

The trailing quantities are computed from `data.bars` with the features' own formulas, so they
equal the `log_ret_h` and `realized_vol_W` feature columns and need no feature set.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ml.baselines import Persistence as TransitionTable
from ml.forecasters.base import (
    DIRECTION,
    DIRECTION_COLUMNS,
    RETURNS,
    SIGMA,
    FoldData,
    Forecaster,
    register,
)
from ml.forecasters.stats_common import (
    LOG_RETURN,
    bar_series,
    fit_per_symbol,
    fitted,
    label_config,
    on_scored,
)


def _trailing(data: FoldData) -> pl.DataFrame:
    """Per bar: `log_ret_h` for the direction horizon and every return horizon, and `sigma`."""
    spec = data.targets
    log_close = pl.col("close").log()
    horizons = sorted({spec.horizon(DIRECTION), *spec.return_horizons})
    return bar_series(
        data,
        **{f"log_ret_{h}": log_close.diff(h) for h in horizons},
        sigma=LOG_RETURN.rolling_std(spec.sigma_window),
    )


@register
class Persistence(Forecaster):
    name = "persistence"
    targets = (DIRECTION, SIGMA, RETURNS)

    def __init__(self) -> None:
        self.tables: dict[str, TransitionTable] = {}

    def fit(self, data: FoldData) -> Persistence:
        """The transition table of each symbol's training rows."""
        cfg, target = label_config(data.targets), data.targets.direction
        trailing = f"log_ret_{cfg.direction_horizon}"
        train = data.train.select(["symbol", "ts", target]).join(
            _trailing(data).select(["symbol", "ts", trailing]), on=["symbol", "ts"], how="left"
        )
        self.tables = fit_per_symbol(
            data, [target], lambda rows: TransitionTable(cfg).fit(rows, target), train=train
        )
        return self

    def predict(self, data: FoldData) -> pl.DataFrame:
        """Transition probabilities of the trailing class, trailing sigma and trailing returns."""
        spec = data.targets
        trailing = _trailing(data)
        frame = on_scored(
            data, trailing, [c for c in trailing.columns if c not in ("symbol", "ts")]
        )
        probs = np.empty((frame.height, len(DIRECTION_COLUMNS)))
        symbols = frame["symbol"].to_numpy()
        for symbol in frame["symbol"].unique(maintain_order=True):
            idx = np.flatnonzero(symbols == symbol)
            probs[idx] = fitted(self.tables, symbol).predict_proba(frame[idx])
        return frame.select(
            "symbol",
            "ts",
            *[pl.Series(c, probs[:, k]) for k, c in enumerate(DIRECTION_COLUMNS)],
            "sigma",
            *[pl.col(f"log_ret_{h}").alias(spec.return_column(h)) for h in spec.return_horizons],
        )
