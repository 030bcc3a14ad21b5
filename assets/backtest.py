"""Backtest: positions from the model's test-period forecasts, after fees and slippage."""

import json

import dagster as dg
import polars as pl

from assets.metadata import png_md, table_md
from assets.training import MODELS, SPLIT, predictions
from ml.backtest import BacktestConfig, plot_equity, run_backtest
from pipelines.partitions import SINGLE_RUN
from pipelines.resources import WarehouseResource
from warehouse.artifacts import content_version, frame_fingerprint


class BacktestSettings(dg.Config):
    threshold: float = 0.10
    allow_short: bool = True
    fee_bps: float = 10.0
    slippage_bps: float = 5.0


@dg.asset(
    deps=[predictions],
    group_name="backtest",
    kinds={"polars", "matplotlib"},
    code_version="1",
    backfill_policy=SINGLE_RUN,
    description="For LightGBM and Mamba2: long/flat/short from p_up - p_down, executed at the next bar's open with "
    "fees and slippage, against buy-and-hold and momentum on the same bars.",
)
def backtest(
    context: dg.AssetExecutionContext, config: BacktestSettings, warehouse: WarehouseResource
) -> dg.MaterializeResult:
    cfg = BacktestConfig(config.threshold, config.allow_short, config.fee_bps, config.slippage_bps)
    lake, store = warehouse.lake(), warehouse.artifacts()
    pmeta = lake.read_meta("predictions")
    preds = (
        lake.read("predictions")
        .filter(pl.col("split") == "test")
        .select(
            [
                "symbol",
                "ts",
                "open",
                "close",
                *[f"{m}_p_{c}" for m in MODELS for c in ("down", "up")],
            ]
        )
    )
    paths, metrics = run_backtest(preds, cfg, forecasters=MODELS)
    version = content_version(
        "backtest",
        pmeta["model_version"],
        pmeta["mamba2_version"],
        cfg.__dict__,
        frame_fingerprint(preds),
    )
    fig = plot_equity(
        paths,
        f"Test period, after {cfg.fee_bps:g} bps fees + "
        f"{cfg.slippage_bps:g} bps slippage (LightGBM {pmeta['model_version']}, "
        f"Mamba2 {pmeta['mamba2_version']})",
    )

    def write(folder):
        paths.write_parquet(folder / "equity.parquet")
        metrics.write_parquet(folder / "metrics.parquet")
        (folder / "metrics.json").write_text(json.dumps(metrics.to_dicts(), indent=2))
        fig.savefig(folder / "equity.png", dpi=110)

    art = store.write(
        "backtest",
        SPLIT,
        version,
        write,
        {
            "model_version": pmeta["model_version"],
            "mamba2_version": pmeta["mamba2_version"],
            "config": cfg.__dict__,
        },
    )
    context.log.info(
        f"backtest {version}:\n{metrics.select(['symbol', 'strategy', 'sharpe', 'cagr', 'max_drawdown'])}"
    )
    sharpe = {m: float(metrics.filter(pl.col("strategy") == m)["sharpe"].mean()) for m in MODELS}
    return dg.MaterializeResult(
        metadata={
            "backtest_version": version,
            "model_version": pmeta["model_version"],
            "mamba2_version": pmeta["mamba2_version"],
            "path": dg.MetadataValue.path(str(art.path)),
            "plot_path": dg.MetadataValue.path(str(art.path / "equity.png")),
            "metrics": table_md(
                metrics.select(
                    [
                        "symbol",
                        "strategy",
                        "total_return",
                        "cagr",
                        "sharpe",
                        "sortino",
                        "max_drawdown",
                        "turnover_per_year",
                        "hit_rate",
                        "exposure",
                    ]
                ),
                rows=50,
            ),
            **{f"mean_{m}_sharpe": v for m, v in sharpe.items()},
            "equity_curve": png_md(fig, "equity curves"),
        }
    )
