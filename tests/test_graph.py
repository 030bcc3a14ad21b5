"""The whole asset graph, materialized in-process on a small synthetic range."""

import json
from dataclasses import dataclass
from datetime import datetime

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch

from assets.leakage import LEAKAGE_CHECKS
from assets.quality import QUALITY_CHECKS
from ml.backbone import BackboneConfig, Forecaster
from ml.dataset import Standardizer
from ml.features import FeatureConfig
from ml.labels import LabelConfig
from ml.sequence_data import build_lanes
from pipelines.definitions import ALL_ASSETS, default_resources
from pipelines.report import report
from pipelines.resources import MarketSourcesResource
from pipelines.train_mamba import predict
from warehouse import ArtifactStore, DataPaths, Lake, Warehouse
from warehouse.sources.base import SourceFetchError, register
from warehouse.sources.synthetic import SyntheticOHLCV

START, END = "2018-01-01", "2021-12-31"
EVERYTHING = [*ALL_ASSETS, *QUALITY_CHECKS, *LEAKAGE_CHECKS]
ASSET_NAMES = {a.key.to_user_string() for a in ALL_ASSETS}


def _range_tags(start=START, end=END):
    return {"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end}


def _run(
    root,
    selection=None,
    tags=None,
    partition_key=None,
    resources=None,
    run_config=None,
    raise_on_error=True,
):
    return dg.materialize(
        EVERYTHING,
        selection=selection,
        resources=resources or default_resources(str(root)),
        tags=tags if partition_key is None else None,
        partition_key=partition_key,
        run_config=run_config,
        raise_on_error=raise_on_error,
    )


def _messages(exc: BaseException) -> str:
    """The messages of an exception and everything it was raised from (Dagster wraps user errors)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = getattr(exc, "user_exception", None) or exc.__cause__
    return " | ".join(parts)


def _materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph") / "data"
    result = _run(root, tags=_range_tags())
    return root, result


def test_every_asset_materializes_and_every_check_passes(built):
    _, result = built
    assert result.success
    assert _materialized(result) == ASSET_NAMES
    evaluations = result.get_asset_check_evaluations()
    assert len(evaluations) == 9 and all(e.passed for e in evaluations), [
        (e.check_name, e.description) for e in evaluations if not e.passed
    ]


def test_warehouse_holds_the_whole_range(built):
    root, _ = built
    summary = Warehouse(DataPaths.at(root)).summary("ohlcv")
    btc = summary.filter(pl.col("entity") == "BTC-USD").row(0, named=True)
    assert btc["rows"] == 1461
    assert btc["first"] == datetime(2018, 1, 1) and btc["last"] == datetime(2021, 12, 31)


def test_outputs_are_in_the_lake_and_artifact_store(built):
    root, result = built
    paths = DataPaths.at(root)
    lake = Lake(paths.lake)
    with Warehouse(paths).connect() as con:
        for table in ("features", "labels", "training_dataset", "predictions"):
            assert lake.exists(table), table
            # the DuckDB view reads the current version only
            (n,) = con.sql(f"SELECT count(*) FROM lake_{table}").fetchall()[0]  # noqa: S608
            assert n == lake.read(table).height > 0, table
    arts = ArtifactStore(paths.artifacts)
    model = arts.latest("model", "holdout")
    arts.verify(model)
    backtest = arts.latest("backtest", "holdout")
    assert backtest.file("equity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = result.asset_materializations_for_node("model")[0].metadata
    assert md["model_version"].value == model.version


def test_evaluation_scores_model_and_baselines_on_the_same_test_rows(built):
    root, result = built
    meta = Lake(DataPaths.at(root).lake).read_meta("training_dataset")
    ev = result.asset_materializations_for_node("evaluation")[0].metadata
    assert ev["test_rows"].value > 100
    first_test_day = ev["test_period"].value.split(" .. ")[0]
    assert first_test_day >= meta["split"]["test_start"][:10]
    table = ev["metrics"].value
    for name in ("lightgbm", "mamba2", "climatology", "persistence"):
        assert f"| {name} " in table, table
    assert ev["mamba2_log_loss"].value > 0 and ev["lightgbm_log_loss"].value > 0
    assert "ci95_low" in ev["log_loss_vs_baselines"].value


def test_report_points_at_the_results(built):
    root, _ = built
    text = report(str(root))
    assert "evaluation" in text and "climatology" in text and "equity.png" in text


def test_rematerializing_a_partition_or_the_range_keeps_row_counts(built):
    root, _ = built
    wh = Warehouse(DataPaths.at(root))
    before = {t: wh.count(t) for t in ("ohlcv", "onchain", "macro")}
    ingest = dg.AssetSelection.groups("ingest")
    assert _run(root, selection=ingest, partition_key="2020-06-15").success
    assert _run(root, selection=ingest, tags=_range_tags("2019-01-01", "2019-12-31")).success
    assert {t: wh.count(t) for t in before} == before


def test_rerunning_training_reuses_the_identical_model_version(built):
    root, _ = built
    arts = ArtifactStore(DataPaths.at(root).artifacts)
    first = arts.latest("model", "holdout").version
    result = _run(root, selection=dg.AssetSelection.groups("features", "training"))
    md = result.asset_materializations_for_node("model")[0].metadata
    assert md["model_version"].value == first
    assert md["reused_existing"].value is True
    assert len(arts.list("model", "holdout")) == 1


@register("ohlcv", "corrupt-test")
@dataclass
class _CorruptOHLCV(SyntheticOHLCV):
    """Synthetic bars whose high is below the low on one day: passes the schema, fails quality."""

    name: str = "corrupt-test"

    def fetch(self, start, end):
        bad = datetime(2019, 5, 1)
        return (
            super()
            .fetch(start, end)
            .with_columns(
                high=pl.when(pl.col("ts") == bad)
                .then(pl.col("low") * 0.5)
                .otherwise(pl.col("high"))
            )
        )


def test_a_failed_quality_check_blocks_everything_downstream(tmp_path):
    root = tmp_path / "data"
    resources = {
        **default_resources(str(root)),
        "sources": MarketSourcesResource(ohlcv_source="corrupt-test"),
    }
    result = _run(
        root,
        tags=_range_tags("2019-01-01", "2019-12-31"),
        resources=resources,
        raise_on_error=False,
    )
    assert not result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["ohlcv_quality"].passed
    assert "column_B=low" in checks["ohlcv_quality"].description
    assert checks["macro_quality"].passed
    done = _materialized(result)
    assert {"ohlcv_bars", "onchain_metrics", "macro_series"} <= done
    assert not done & {"features", "labels", "training_dataset", "model", "mamba_model", "backtest"}
    assert not Lake(DataPaths.at(root).lake).exists("features")


def test_an_unknown_symbol_fails_the_run_before_anything_is_written(tmp_path):
    root = tmp_path / "data"
    resources = {
        **default_resources(str(root)),
        "sources": MarketSourcesResource(symbols=["BTC-USD", "NOPE"]),
    }
    with pytest.raises(Exception) as failure:
        _run(root, tags=_range_tags("2019-01-01", "2019-01-31"), resources=resources)
    assert "Unknown symbols ['NOPE'] for source 'synthetic'" in _messages(failure.value)
    assert not DataPaths.at(root).duckdb_file.exists()


def test_an_invalid_label_threshold_fails_before_labels_are_written(built, tmp_path):
    root, _ = built
    labels_dir = Lake(DataPaths.at(root).lake).table_dir("labels")
    before = sorted((p, p.stat().st_mtime_ns) for p in labels_dir.rglob("*.parquet"))
    with pytest.raises(Exception) as failure:
        _run(
            root,
            selection=["labels"],
            run_config={"ops": {"labels": {"config": {"up_threshold": -0.2}}}},
        )
    assert "down < 0 < up" in _messages(failure.value)
    assert sorted((p, p.stat().st_mtime_ns) for p in labels_dir.rglob("*.parquet")) == before


def test_the_ohlcv_source_is_chosen_through_run_config(tmp_path):
    """A 1-minute Parquet file, picked by resource config, fills all three bar tables."""
    root = tmp_path / "data"
    start = datetime(2021, 1, 1)
    ts = pl.datetime_range(start, datetime(2021, 1, 3), "1m", closed="left", eager=True)
    n = ts.len()
    price = pl.Series(range(n), dtype=pl.Float64) * 0.01 + 100
    path = tmp_path / "btc_1m.parquet"
    pl.DataFrame(
        {
            "ts": ts,
            "open": price,
            "high": price + 1,
            "low": price - 1,
            "close": price,
            "volume": 1.0,
        }
    ).write_parquet(path)
    config = {
        "resources": {
            "sources": {
                "config": {"ohlcv_source": "file", "ohlcv_path": str(path), "symbols": ["BTC-USD"]}
            }
        }
    }
    result = dg.materialize(
        EVERYTHING,
        selection=["ohlcv_bars"],
        resources={
            **default_resources(str(root)),
            "sources": MarketSourcesResource.configure_at_launch(),
        },
        run_config=config,
        tags=_range_tags("2021-01-01", "2021-01-02"),
    )
    assert result.success
    md = result.asset_materializations_for_node("ohlcv_bars")[0].metadata
    assert md["timeframe"].value == "1m" and md["source"].value == "file"
    assert md["rows_written"].value == {"ohlcv_1m": 2880, "ohlcv_1h": 48, "ohlcv": 2}
    wh = Warehouse(DataPaths.at(root))
    assert (wh.count("ohlcv_1m"), wh.count("ohlcv_1h"), wh.count("ohlcv")) == (2880, 48, 2)


@register("macro", "truncated-test")
@dataclass
class _TruncatedMacro:
    """A macro source whose payload arrives cut off: it must fail before any write."""

    series: tuple[str, ...] = ("DGS10",)
    name: str = "truncated-test"
    table: str = "macro"

    @property
    def entities(self) -> tuple[str, ...]:
        return self.series

    def fetch(self, start, end):
        raise SourceFetchError(
            f"truncated-test: payload for DGS10 [{start:%Y-%m-%d}, {end:%Y-%m-%d}) ended mid-record"
        )


def test_a_failed_fetch_leaves_the_warehouse_as_it_was(built, tmp_path):
    root, _ = built
    wh = Warehouse(DataPaths.at(root))
    before = wh.read("macro")
    resources = {
        **default_resources(str(root)),
        "sources": MarketSourcesResource(macro_source="truncated-test"),
    }
    with pytest.raises(Exception) as failure:
        _run(root, selection=["macro_series"], partition_key="2020-06-15", resources=resources)
    assert "ended mid-record" in _messages(failure.value)
    assert wh.read("macro").equals(before)


def test_the_mamba2_artifact_reloads_and_reproduces_its_predictions(built):
    root, result = built
    paths = DataPaths.at(root)
    art = ArtifactStore(paths.artifacts).latest("mamba2", "holdout")
    md = result.asset_materializations_for_node("mamba_model")[0].metadata
    assert md["model_version"].value == art.version and md["epochs_run"].value >= 1
    cfg_json = json.loads(art.file("config.json").read_text())
    cfg = BackboneConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_json["backbone"].items()}
    )
    model = Forecaster(cfg)
    model.load_state_dict(torch.load(art.file("weights.pt"), weights_only=True)["model"])
    lake = Lake(paths.lake)
    meta = lake.read_meta("training_dataset")
    lanes = build_lanes(
        lake.read("features"),
        lake.read("labels"),
        lake.read("training_dataset"),
        meta["feature_columns"],
        cfg.horizons,
        cfg_json["direction_column"],
        "fwd_ret_90",
        "fwd_vol_30",
        scaler=Standardizer.from_json(art.file("scaler.json").read_text()),
    )
    again = predict(model, lanes, torch.device("cpu"), chunk=97)  # another chunking, same state
    saved = pl.read_parquet(art.file("predictions.parquet"))
    assert again.height == saved.height
    assert np.allclose(again["mamba_p_up"], saved["mamba_p_up"], atol=1e-5)


def test_feature_and_label_versions_name_their_parquet_paths(built):
    root, result = built
    lake = Lake(DataPaths.at(root).lake)
    for node, key, version in (
        ("features", "feature_version", FeatureConfig().version()),
        ("labels", "label_version", LabelConfig().version()),
    ):
        md = result.asset_materializations_for_node(node)[0].metadata
        assert md[key].value == version == lake.current_version(node)
        assert md["path"].value.endswith(f"version={version}")
        assert all(f"version={version}" in str(f) for f in lake.files(node))

    default, changed = LabelConfig().version(), LabelConfig(up_threshold=0.1).version()
    assert default != changed
    run = _run(
        root,
        selection=["labels"],
        run_config={"ops": {"labels": {"config": {"up_threshold": 0.1}}}},
    )
    md = run.asset_materializations_for_node("labels")[0].metadata
    assert md["path"].value.endswith(f"version={changed}")
    assert set(lake.versions("labels")) == {default, changed}  # the old version is kept
    assert lake.read_meta("labels")["config"]["up_threshold"] == 0.1
    _run(root, selection=["labels"])  # back to the defaults: their path is current again
    assert lake.current_version("labels") == default
