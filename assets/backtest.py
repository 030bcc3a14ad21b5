"""Backtests of the direction forecasts: per walk-forward fold on its test window, after fees,
slippage and the exit, against buy-and-hold and momentum on the same bars.

ml.backtest (scipy), matplotlib and the forecasters are imported inside the functions that use
them, so loading the definitions stays fast.
"""

import json
from typing import TYPE_CHECKING

import dagster as dg
import polars as pl

from assets.metadata import png_md, table_md, uri
from assets.partitions import SINGLE_RUN, fold_partitions
from assets.resources import WarehouseResource
from assets.training import _fold, predictions
from ml.sequence_names import SEQUENCE_BASELINE_NAMES
from warehouse.artifacts import content_version, frame_fingerprint

if TYPE_CHECKING:
    from ml.backtest import BacktestConfig

# the direction forecasters that are traded (constant-probability baselines are not: they would
# hold one position throughout, which buy-and-hold already shows)
TRADED = (
    "mamba2",
    "lightgbm",
    *SEQUENCE_BASELINE_NAMES,
    "random_forest",
    "xgboost",
    "ensemble",
    "rf_xgb_lstm",
)


class BacktestSettings(dg.Config):
    threshold: float = 0.10
    allow_short: bool = True
    holding_period: int = 1  # bars a decision is held; 90 trades once per forecast horizon
    vol_target: float = 0.0  # annualized; 0 = unit size (no volatility targeting)
    fee_bps: float = 10.0
    slippage_bps: float = 5.0

    def to_ml(self) -> "BacktestConfig":
        from ml.backtest import BacktestConfig

        try:
            return BacktestConfig(
                threshold=self.threshold,
                allow_short=self.allow_short,
                fee_bps=self.fee_bps,
                slippage_bps=self.slippage_bps,
                holding_period=self.holding_period,
                vol_target=self.vol_target or None,
            )
        except ValueError as e:
            raise dg.Failure(f"Invalid backtest settings: {e}") from e


def backtest_grid(cfg: "BacktestConfig") -> pl.DataFrame:
    """The parameter sets tried beside the default (their count deflates the best Sharpe)."""
    from ml.backtest import parameter_grid

    return parameter_grid(
        thresholds=(0.0, 0.05, 0.1, 0.2, 0.3),
        allow_short=(True, False),
        holding_periods=(1, 30, 90),
        vol_targets=(None, 0.5),
        costs_bps=((cfg.fee_bps, cfg.slippage_bps),),
    )


@dg.asset(
    deps=[predictions],
    group_name="backtest",
    kinds={"polars", "matplotlib"},
    partitions_def=fold_partitions,
    backfill_policy=SINGLE_RUN,
    code_version="3",
    description="Per walk-forward fold, on its test window: long/flat/short from p_up - p_down "
    "of each traded forecaster (optionally held for a horizon and volatility-targeted from its "
    "sigma), filled at the next open after fees, slippage and the exit, against buy-and-hold and "
    "momentum; a parameter grid with the deflated Sharpe ratio of its best set.",
)
def backtest(
    context: dg.AssetExecutionContext, config: BacktestSettings, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    from ml.backtest import BACKTEST_CODE_VERSION, plot_equity, run_backtest, run_grid
    from ml.walkforward_run import backtest_frame

    cfg = config.to_ml()
    lake, store = warehouse.lake(), warehouse.artifacts()
    meta = lake.read_meta("training_dataset")
    prices = lake.read("training_dataset")  # open, close and the trailing log_ret_* columns
    summary, last_fig = [], None
    for key in context.partition_keys:
        _fold(meta, key)
        pred = store.latest("predictions", key)
        long = pl.read_parquet(pred.file("predictions.parquet")).filter(pl.col("split") == "test")
        traded = tuple(n for n in TRADED if n in set(long["forecaster"]))
        frame = backtest_frame(long, prices, traded)
        version = content_version(
            "backtest", BACKTEST_CODE_VERSION, pred.version, cfg.__dict__, frame_fingerprint(frame)
        )
        paths, metrics = run_backtest(frame, cfg, forecasters=traded)
        grid = run_grid(frame, backtest_grid(cfg), cfg, forecasters=traded)
        fig = plot_equity(
            paths, f"Fold {key} test window, after {cfg.fee_bps:g}+{cfg.slippage_bps:g} bps"
        )

        def write(folder, paths=paths, metrics=metrics, grid=grid, fig=fig):
            paths.write_parquet(folder / "equity.parquet")
            metrics.write_parquet(folder / "metrics.parquet")
            grid.summary.write_parquet(folder / "grid_summary.parquet")
            grid.metrics.write_parquet(folder / "grid_metrics.parquet")
            (folder / "metrics.json").write_text(json.dumps(metrics.to_dicts(), indent=2))
            fig.savefig(folder / "equity.png", dpi=110)

        art = store.write(
            "backtest",
            key,
            version,
            write,
            {"predictions_version": pred.version, "fold": key, "config": cfg.__dict__},
        )
        for row in metrics.filter(
            pl.col("strategy").is_in([*traded[:2], "buy_and_hold"])
        ).iter_rows(named=True):
            summary.append(
                {
                    "fold": key,
                    "symbol": row["symbol"],
                    "strategy": row["strategy"],
                    "total_return": row["total_return"],
                    "sharpe": row["sharpe"],
                    "max_drawdown": row["max_drawdown"],
                    "version": art.version,
                }
            )
        last_fig = fig
    table = pl.DataFrame(summary)
    context.log.info(f"backtest:\n{table}")
    return dg.MaterializeResult(
        metadata={
            "folds": table_md(table, rows=200),
            # one fold: its artifact; a range: the folder of every fold's
            **uri(art.path if len(context.partition_keys) == 1 else store.root / "backtest"),
            **({"equity_curve": png_md(last_fig, "equity curves")} if last_fig else {}),
        }
    )
