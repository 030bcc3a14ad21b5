"""Compute the full feature and label set on N synthetic 1-minute bars, and the indicators it
shares with pandas-ta-classic with pandas-ta-classic on the same bars.

    python benchmarks/features.py [--rows 5000000] [--shared-data] [--out benchmarks/results/features.json]

On-chain and macro inputs are empty frames in the warehouse schemas: minute bars are the
point, and the joins on a few thousand daily rows cost nothing next to them.
`polars_s` is `compute_features` + `compute_labels` (every column); `pandas_ta_s` is
pandas-ta-classic computing only the shared indicators (SMA, EMA, RSI, MACD, BBANDS, ATR,
NATR, ROC, MOM); `speedup` = pandas_ta_s / polars_s, so polars does more work in its time.
`polars_shared_s` times the same shared indicators alone in polars, for a like-for-like ratio.
Prints a final JSON line. Targets: speedup >= 20; polars_s < 10 on 2 cores for 5M bars.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml.features import FeatureConfig, compute_features  # noqa: E402
from ml.indicators import atr, bbands, ema, macd, mom, natr, roc, rsi, sma  # noqa: E402
from ml.labels import LabelConfig, compute_labels  # noqa: E402
from warehouse.schema import MACRO, ONCHAIN  # noqa: E402
from warehouse.sources import make_source  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import pandas_ta_classic as ta

SHARED_HOURLY = ROOT.parent / "shared" / "data" / "btc_usd_1h_bitstamp.csv"


def shared_indicators_pandas_ta(bars: pl.DataFrame, cfg: FeatureConfig) -> dict:
    """The indicators `compute_features` shares with pandas-ta, by pandas-ta-classic."""
    close, high, low = (bars[c].to_pandas() for c in ("close", "high", "low"))
    fast, slow, sig = cfg.macd
    return {
        **{n: ta.sma(close, n) for n in cfg.sma_lengths},
        **{n: ta.ema(close, n) for n in cfg.ema_lengths},
        "rsi": ta.rsi(close, cfg.rsi_length),
        "macd": ta.macd(close, fast, slow, sig),
        "bbands": ta.bbands(close, cfg.bbands_length, cfg.bbands_std),
        "atr": ta.atr(high, low, close, cfg.atr_length),
        "natr": ta.natr(high, low, close, cfg.atr_length),
        "roc": ta.roc(close, cfg.roc_length),
        "mom": ta.mom(close, cfg.roc_length),
    }


def shared_indicators_polars(bars: pl.DataFrame, cfg: FeatureConfig) -> pl.DataFrame:
    """The same indicators as polars expressions from `ml.indicators`."""
    by = "symbol"
    close, high, low = pl.col("close"), pl.col("high"), pl.col("low")
    exprs = {
        **{f"SMA_{n}": sma(close, n, by) for n in cfg.sma_lengths},
        **{f"EMA_{n}": ema(close, n, by) for n in cfg.ema_lengths},
        "RSI": rsi(close, cfg.rsi_length, by),
        **macd(close, *cfg.macd, by),
        **bbands(close, cfg.bbands_length, cfg.bbands_std, by),
        "ATR": atr(high, low, close, cfg.atr_length, by),
        "NATR": natr(high, low, close, cfg.atr_length, by),
        "ROC": roc(close, cfg.roc_length, by),
        "MOM": mom(close, cfg.roc_length, by),
    }
    return bars.lazy().select([e.alias(k) for k, e in exprs.items()]).collect()


def run(bars: pl.DataFrame, label: str) -> dict:
    fcfg, lcfg = FeatureConfig(), LabelConfig()
    onchain, macro = (pl.DataFrame(schema=t.columns) for t in (ONCHAIN, MACRO))
    t0 = time.perf_counter()
    feats = compute_features(bars, onchain, macro, fcfg)
    labels = compute_labels(bars, lcfg)
    polars_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    shared_indicators_polars(bars, fcfg)
    polars_shared_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    reference = shared_indicators_pandas_ta(bars, fcfg)
    pandas_ta_s = time.perf_counter() - t0

    ours = feats["RSI_14"].to_numpy()
    ref = reference["rsi"].to_numpy()
    warm = ~np.isnan(ref)
    max_rsi_diff = float(np.max(np.abs(ours[warm] - ref[warm])))
    result = {
        "data": label,
        "rows": bars.height,
        "feature_columns": feats.width,
        "label_columns": labels.width,
        "polars_s": round(polars_s, 3),
        "polars_shared_s": round(polars_shared_s, 3),
        "pandas_ta_s": round(pandas_ta_s, 3),
        "speedup": round(pandas_ta_s / polars_s, 2),
        "speedup_shared": round(pandas_ta_s / polars_shared_s, 2),
        "max_abs_rsi_diff_vs_pandas_ta": max_rsi_diff,
    }
    print(json.dumps(result), flush=True)
    return result


def shared_hourly_bars() -> pl.DataFrame:
    """Bitstamp hourly BTC-USD bars from the shared data folder, in the OHLCV schema."""
    return (
        pl.read_csv(SHARED_HOURLY, try_parse_dates=True)
        .select(
            pl.lit("BTC-USD").alias("symbol"),
            pl.col("datetime_utc").dt.replace_time_zone(None).dt.cast_time_unit("us").alias("ts"),
            "open",
            "high",
            "low",
            "close",
            pl.col("volume_btc").alias("volume"),
        )
        .sort("ts")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--shared-data", action="store_true", help=f"also run on {SHARED_HOURLY}")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "features.json"))
    args = ap.parse_args()

    days = -(-args.rows // 1440)
    start = datetime(2015, 1, 1)
    end = start + timedelta(days=days)
    t0 = time.perf_counter()
    bars = make_source("ohlcv", "synthetic", symbols=("BTC-USD",), timeframe="1m").fetch(start, end)
    bars = bars.head(args.rows)
    print(f"generated {bars.height:,} minute bars in {time.perf_counter() - t0:.2f} s", flush=True)

    runs = []
    if args.shared_data and SHARED_HOURLY.exists():
        runs.append(run(shared_hourly_bars(), SHARED_HOURLY.name))
    elif args.shared_data:
        print(f"{SHARED_HOURLY} not found; skipped", flush=True)
    main_run = run(bars, "synthetic 1m")
    summary = {
        **main_run,
        "cpus": os.cpu_count(),
        "polars_threads": pl.thread_pool_size(),
        "python": platform.python_version(),
        "polars": pl.__version__,
        "onchain_macro": "empty frames",
        "targets_met": main_run["speedup"] >= 20 and main_run["polars_s"] < 10,
        "other_runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
