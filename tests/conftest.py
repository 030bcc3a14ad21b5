from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from warehouse import DataPaths, Warehouse
from warehouse.sources import make_source

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
