"""The forecaster contract: every model and baseline predicts the same target columns for the
same rows of a walk-forward fold, fitted on that fold's training rows only.

Targets and their prediction columns (one wide row per (symbol, ts)):

| target     | label column (realized)  | prediction columns           |
|------------|--------------------------|------------------------------|
| direction  | `direction_<H>` 0/1/2    | `p_down`, `p_flat`, `p_up`   |
| quantiles  | `fwd_ret_<H>`            | `q10`, `q90` (of that return)|
| sigma      | `fwd_vol_<W>`            | `sigma` (std of 1-bar returns over the next W bars) |
| returns    | `fwd_ret_<h>` per h      | `ret_<h>` (log return)       |

A forecaster covers any subset of the targets (`targets`); it leaves the others out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar

import polars as pl

from ml.dataset import TEST, TRAIN, VAL
from ml.labels import LabelConfig
from ml.walkforward import Fold, assign_fold

DIRECTION, QUANTILES, SIGMA, RETURNS = "direction", "quantiles", "sigma", "returns"
ALL_TARGETS = (DIRECTION, QUANTILES, SIGMA, RETURNS)
DIRECTION_COLUMNS = ("p_down", "p_flat", "p_up")
RETURN_HORIZONS = (1, 5, 10, 30)


@dataclass(frozen=True)
class TargetSpec:
    """Which label columns each target is scored against, and the horizon of each (in bars)."""

    direction: str = "direction_90"
    direction_horizon: int = 90
    up_threshold: float = 0.05  # the direction label's thresholds (simple return)
    down_threshold: float = -0.05
    quantile: str = "fwd_ret_90"
    quantile_levels: tuple[float, float] = (0.1, 0.9)
    sigma: str = "fwd_vol_30"
    sigma_window: int = 30
    return_horizons: tuple[int, ...] = RETURN_HORIZONS

    @classmethod
    def from_label_config(cls, cfg: LabelConfig) -> TargetSpec:
        horizons = tuple(h for h in RETURN_HORIZONS if h in cfg.horizons)
        return cls(
            direction=f"direction_{cfg.direction_horizon}",
            direction_horizon=cfg.direction_horizon,
            up_threshold=cfg.up_threshold,
            down_threshold=cfg.down_threshold,
            quantile=f"fwd_ret_{cfg.direction_horizon}",
            sigma=f"fwd_vol_{cfg.vol_window}",
            sigma_window=cfg.vol_window,
            return_horizons=horizons,
        )

    @property
    def quantile_columns(self) -> tuple[str, str]:
        return tuple(f"q{round(100 * q):02d}" for q in self.quantile_levels)  # type: ignore[return-value]

    def return_column(self, h: int) -> str:
        return f"ret_{h}"

    def return_label(self, h: int) -> str:
        return f"fwd_ret_{h}"

    def prediction_columns(self, target: str) -> tuple[str, ...]:
        if target == DIRECTION:
            return DIRECTION_COLUMNS
        if target == QUANTILES:
            return self.quantile_columns
        if target == SIGMA:
            return ("sigma",)
        if target == RETURNS:
            return tuple(self.return_column(h) for h in self.return_horizons)
        raise ValueError(f"Unknown target {target!r}; use one of {ALL_TARGETS}")

    def label_columns(self) -> list[str]:
        return [
            self.direction,
            self.quantile,
            self.sigma,
            *[self.return_label(h) for h in self.return_horizons],
        ]

    def horizon(self, target: str) -> int:
        """The longest label window of a target, in bars (the overlap of neighbouring rows)."""
        return {
            DIRECTION: self.direction_horizon,
            QUANTILES: self.direction_horizon,
            SIGMA: self.sigma_window,
            RETURNS: max(self.return_horizons),
        }[target]


@dataclass
class FoldData:
    """One walk-forward fold, as every forecaster sees it.

    rows: the dataset rows of the fold, sorted by (symbol, ts): `symbol`, `ts`, `split`
      (train / val / test; purged rows are gone), `open`, `high`, `low`, `close`, the feature
      columns and the label columns (labels are null where their window runs past the data).
    bars: every daily bar of every symbol from the start of the history up to the last row of
      `rows`: `symbol`, `ts`, `open`, `high`, `low`, `close`. Causal filters (EWMA, GARCH, HAR)
      run over it; a value used at time t may only depend on bars up to t.
    fit_end: the information cutoff for fitting. Parameters (GARCH coefficients, regressions,
      class frequencies, scalers) may use bars and label windows before it only; it is the
      validation start minus the embargo, so every training label window ends before it.
    val_end: the same cutoff for choices made on validation rows (early stopping, ensemble
      weights): the test start minus the embargo.
    """

    key: str
    rows: pl.DataFrame
    bars: pl.DataFrame
    feature_columns: list[str]
    targets: TargetSpec
    fit_end: datetime
    val_end: datetime
    # every dataset row (features) before the test end, purged ones included: the input history
    # of stateful models, which see each bar once in order; None where no model needs it
    inputs: pl.DataFrame | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def replace(self, **changes) -> FoldData:
        """This fold with some fields changed (other rows, bars or inputs) and a fresh segment
        cache: `dataclasses.replace` alone would carry the old rows' cached segments over."""
        return dataclasses.replace(self, **changes, _cache={})

    def segment(self, name: str) -> pl.DataFrame:
        if name not in self._cache:
            self._cache[name] = self.rows.filter(pl.col("split") == name)
        return self._cache[name]

    @property
    def train(self) -> pl.DataFrame:
        return self.segment(TRAIN)

    @property
    def val(self) -> pl.DataFrame:
        return self.segment(VAL)

    @property
    def test(self) -> pl.DataFrame:
        return self.segment(TEST)

    @property
    def scored(self) -> pl.DataFrame:
        """The rows every forecaster predicts: validation and test, in (symbol, ts) order."""
        if "scored" not in self._cache:
            self._cache["scored"] = self.rows.filter(pl.col("split").is_in([VAL, TEST]))
        return self._cache["scored"]


class Forecaster:
    """Base class: `fit` on a fold's training rows (validation only for early stopping),
    `predict` the fold's scored rows. Subclasses set `name` and `targets`."""

    name: ClassVar[str] = ""
    targets: ClassVar[tuple[str, ...]] = ()

    def fit(self, data: FoldData) -> Forecaster:
        raise NotImplementedError

    def predict(self, data: FoldData) -> pl.DataFrame:
        """`symbol`, `ts` of `data.scored` (same order) plus the prediction columns of every
        target in `targets`."""
        raise NotImplementedError


REGISTRY: dict[str, Callable[[], Forecaster]] = {}


def register(cls: type[Forecaster]) -> type[Forecaster]:
    """Class decorator: make a forecaster available by its `name`."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"Forecaster name {cls.name!r} is empty or already registered")
    bad = set(cls.targets) - set(ALL_TARGETS)
    if bad or not cls.targets:
        raise ValueError(f"{cls.__name__}.targets must be a non-empty subset of {ALL_TARGETS}")
    REGISTRY[cls.name] = cls
    return cls


def fold_data(
    rows: pl.DataFrame,
    bars: pl.DataFrame,
    fold: Fold,
    feature_columns: list[str],
    targets: TargetSpec,
) -> FoldData:
    """The FoldData of one fold: `rows` is the whole dataset (features, labels, OHLC,
    `label_end_ts`), `bars` every raw bar; both are cut to what the fold may see."""
    return FoldData(
        key=fold.key,
        rows=assign_fold(rows, fold).sort(["symbol", "ts"]),
        bars=bars.filter(pl.col("ts") < fold.test_end)
        .select(["symbol", "ts", "open", "high", "low", "close"])
        .sort(["symbol", "ts"]),
        feature_columns=list(feature_columns),
        targets=targets,
        fit_end=fold.fit_end,
        val_end=fold.val_end,
        inputs=rows.filter(pl.col("ts") < fold.test_end)
        .select(["symbol", "ts", *feature_columns])
        .sort(["symbol", "ts"]),
    )


FORECASTERS_CODE_VERSION = "3"  # bump when a forecaster changes what it predicts
