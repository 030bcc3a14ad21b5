import os
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from warehouse import DataPaths, Warehouse
from warehouse.sources import make_source

# the real files (../shared/data beside the checkout); MAMBACAST_SHARED_DATA points elsewhere
SHARED_DATA = Path(
    os.environ.get("MAMBACAST_SHARED_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data"
)
NO_SHARED_DATA = "../shared/data is not present"  # the skip reason of every real-file test


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say it out loud when the real files were absent: their tests hold the checks against
    real Bitcoin, on-chain, FRED and stock files, and skipping them is easy to miss."""
    skipped = [
        r
        for r in terminalreporter.stats.get("skipped", [])
        if isinstance(r.longrepr, tuple) and NO_SHARED_DATA in str(r.longrepr[-1])
    ]
    if skipped:
        terminalreporter.write_sep("!", "REAL DATA NOT TESTED", red=True, bold=True)
        terminalreporter.write_line(
            f"{len(skipped)} tests on the real files were skipped: {SHARED_DATA} is absent. "
            "The hourly-to-daily resampling was checked on synthetic bars only "
            "(tests/test_store.py). Put the shared data beside the checkout (../shared/data) "
            "or set MAMBACAST_SHARED_DATA to run them.",
            red=True,
        )


@pytest.fixture
def paths(tmp_path: Path) -> DataPaths:
    return DataPaths.at(tmp_path / "data")


@pytest.fixture
def warehouse(paths: DataPaths) -> Warehouse:
    return Warehouse(paths, lock_timeout_s=60)


@pytest.fixture(scope="session")
def synthetic_ohlcv() -> pl.DataFrame:
    """Six years of the default synthetic market, all symbols."""
    return make_source("ohlcv", "synthetic").fetch(datetime(2016, 1, 1), datetime(2022, 1, 1))


@pytest.fixture(scope="session")
def synthetic_onchain() -> pl.DataFrame:
    return make_source("onchain", "synthetic").fetch(datetime(2016, 1, 1), datetime(2022, 1, 1))


@pytest.fixture(scope="session")
def synthetic_macro() -> pl.DataFrame:
    return make_source("macro", "synthetic").fetch(datetime(2015, 10, 1), datetime(2022, 1, 1))


@pytest.fixture(scope="session")
def synthetic_dataset(synthetic_ohlcv, synthetic_onchain, synthetic_macro) -> dict:
    """Features joined to labels over six synthetic years, as the training dataset holds them."""
    from ml.features import (
        FeatureConfig,
        compute_features,
        model_feature_columns,
        onchain_feature_columns,
    )
    from ml.labels import LabelConfig, compute_labels

    feats = compute_features(synthetic_ohlcv, synthetic_onchain, synthetic_macro)
    cols = [c for c in model_feature_columns(FeatureConfig()) if c in feats.columns]
    labs = compute_labels(synthetic_ohlcv, LabelConfig())
    rows = (
        feats.select(["symbol", "ts", *cols])
        .join(
            synthetic_ohlcv.select(["symbol", "ts", "open", "high", "low", "close"]),
            on=["symbol", "ts"],
        )
        .join(labs, on=["symbol", "ts"])
        # on-chain inputs exist for BTC only; every other feature is past its warm-up
        .drop_nulls([c for c in cols if c not in onchain_feature_columns(FeatureConfig())])
        .sort(["symbol", "ts"])
    )
    return {"rows": rows, "bars": synthetic_ohlcv, "feature_columns": cols}


@pytest.fixture(scope="session")
def synthetic_fold(synthetic_dataset):
    """The 2021 walk-forward fold of the synthetic market (yearly test window, expanding
    training from 2016, 365 validation days): a `FoldData` every forecaster can be fitted on."""
    from ml.forecasters import TargetSpec, fold_data
    from ml.labels import LabelConfig
    from ml.walkforward import WalkForwardConfig, fold_for_key

    d = synthetic_dataset
    fold = fold_for_key("2021", WalkForwardConfig(), d["rows"]["ts"].min())
    return fold_data(
        d["rows"],
        d["bars"],
        fold,
        d["feature_columns"],
        TargetSpec.from_label_config(LabelConfig()),
    )
