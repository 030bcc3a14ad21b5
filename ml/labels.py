"""Forward-looking labels. Each label at t uses bars t+1..t+h only; the last h rows are null."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import polars as pl

from ml.indicators import per_symbol

LABELS_CODE_VERSION = "2"
DOWN, FLAT, UP = 0, 1, 2
DIRECTION_CLASSES = ("down", "flat", "up")


@dataclass(frozen=True)
class LabelConfig:
    horizons: tuple[int, ...] = (1, 5, 10, 30, 90)  # bars
    direction_horizon: int = 90
    up_threshold: float = 0.05  # simple return over the horizon
    down_threshold: float = -0.05
    vol_window: int = 30
    path_horizon: int = 90  # bars of the forward cumulative-return path the quantiles cover
    path_quantiles: tuple[float, ...] = (0.1, 0.9)

    def __post_init__(self) -> None:
        if not self.down_threshold < 0 < self.up_threshold:
            raise ValueError(
                f"Direction thresholds must satisfy down < 0 < up; got "
                f"down={self.down_threshold}, up={self.up_threshold}"
            )
        if self.direction_horizon not in self.horizons:
            raise ValueError(
                f"direction_horizon {self.direction_horizon} must be one of the "
                f"label horizons {self.horizons}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> LabelConfig:
        """The config as recorded in a `_meta.json` (JSON turned its tuples into lists)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def max_horizon(self) -> int:
        return max(*self.horizons, self.vol_window, self.path_horizon)

    def version(self) -> str:
        from warehouse.artifacts import content_version

        return content_version("labels", LABELS_CODE_VERSION, asdict(self))


def label_columns(cfg: LabelConfig) -> list[str]:
    return (
        [f"fwd_ret_{h}" for h in cfg.horizons]
        + [
            f"direction_{cfg.direction_horizon}",
            f"fwd_vol_{cfg.vol_window}",
        ]
        + [path_quantile_column(q, cfg.path_horizon) for q in cfg.path_quantiles]
    )


def label_schema(cfg: LabelConfig) -> dict[str, pl.DataType]:
    """The columns and types of a labels snapshot, in order: the bar's key, `label_columns`
    (the direction class is a small integer: 0 down, 1 flat, 2 up), then `label_end_ts`."""
    direction = f"direction_{cfg.direction_horizon}"
    return {
        "symbol": pl.String(),
        "ts": pl.Datetime("us"),
        **{c: pl.Int8() if c == direction else pl.Float64() for c in label_columns(cfg)},
        "label_end_ts": pl.Datetime("us"),
    }


def path_quantile_column(q: float, horizon: int) -> str:
    """`fwd_ret_p10_90`: the 10th percentile of the next 90 bars' cumulative log returns."""
    return f"fwd_ret_p{round(100 * q):02d}_{horizon}"


def direction_from_log_return(r: pl.Expr, cfg: LabelConfig) -> pl.Expr:
    """0 = down, 1 = flat, 2 = up, from a log return and the simple-return thresholds."""
    return (
        pl.when(r.is_null())
        .then(None)
        .when(r > math.log1p(cfg.up_threshold))
        .then(UP)
        .when(r < math.log1p(cfg.down_threshold))
        .then(DOWN)
        .otherwise(FLAT)
        .cast(pl.Int8)
    )


def _forward_path_quantile(log_close: pl.Expr, q: float, horizon: int) -> pl.Expr:
    """Quantile q (linear interpolation, as numpy's default) of log(close_{t+k} / close_t) over
    k = 1..horizon; null unless all `horizon` later bars exist."""
    # log close_t is the same for every k, so the quantile of the path is the quantile of the
    # next `horizon` log closes minus today's
    later = log_close.rolling_quantile(q, "linear", window_size=horizon).shift(-horizon)
    return later - log_close


def compute_labels(ohlcv: pl.DataFrame, cfg: LabelConfig = LabelConfig()) -> pl.DataFrame:
    """Labels per (symbol, ts), plus `label_end_ts`: the last bar any label of the row looks at.

    Each symbol's bars are labelled apart and in parallel."""
    h_dir = cfg.direction_horizon
    lc = pl.col("_log_close")

    def build(bars: pl.LazyFrame) -> pl.LazyFrame:
        return (
            bars.with_columns(pl.col("close").log().alias("_log_close"))
            .with_columns(
                *[(lc.shift(-h) - lc).alias(f"fwd_ret_{h}") for h in cfg.horizons],
                # std of the next `vol_window` one-bar returns: bars t+1 .. t+vol_window
                (lc.shift(-1) - lc)
                .rolling_std(cfg.vol_window)
                .shift(-(cfg.vol_window - 1))
                .alias(f"fwd_vol_{cfg.vol_window}"),
                *[
                    _forward_path_quantile(lc, q, cfg.path_horizon).alias(
                        path_quantile_column(q, cfg.path_horizon)
                    )
                    for q in cfg.path_quantiles
                ],
                pl.col("ts").shift(-cfg.max_horizon).alias("label_end_ts"),
            )
            .with_columns(
                direction_from_log_return(pl.col(f"fwd_ret_{h_dir}"), cfg).alias(
                    f"direction_{h_dir}"
                )
            )
            .select(["symbol", "ts", *label_columns(cfg), "label_end_ts"])
        )

    return per_symbol(ohlcv.select("symbol", "ts", "close"), build)
