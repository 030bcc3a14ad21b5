"""The whole asset graph, materialized in-process on a small synthetic range."""

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch

from assets.leakage import LEAKAGE_CHECKS
from assets.quality import QUALITY_CHECKS
from assets.resources import MarketSourcesResource
from ml.dataset import TEST, TRAIN, VAL, Standardizer
from ml.features import FeatureConfig
from ml.forecasters import TargetSpec, fold_data
from ml.forecasters.neural import SequenceForecaster, SequenceSettings
from ml.labels import LabelConfig
from ml.sequence_names import SEQUENCE_MODEL_NAMES
from ml.walkforward import Fold, assign_fold
from pipelines.definitions import defs
from pipelines.defs.resources import default_resources
from pipelines.report import report
from warehouse import ArtifactStore, DataPaths, Lake, Warehouse
from warehouse.sources.base import SourceFetchError, register
from warehouse.sources.synthetic import SyntheticOHLCV

START, END = "2016", "2021"  # ingest (year) partitions
FOLDS = ("2020", "2021")  # the last two walk-forward folds of that range
UPSTREAM = dg.AssetSelection.assets("training_dataset").upstream()
FOLD_ASSETS = [
    "model",
    "mamba_model",
    "sequence_baselines",
    "literature_baselines",
    "predictions",
    "backtest",
]
# small and quick: one epoch, two seeds
SEQUENCE = {"epochs": 1, "tbptt_len": 256, "seeds": [0, 1], "patience": 1}
FOLD_CONFIG = {
    "ops": {
        "mamba_model": {"config": SEQUENCE},
        "sequence_baselines": {"config": SEQUENCE},
        "literature_baselines": {"config": SEQUENCE},
    }
}
ALL_ASSETS = list(defs().assets)
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
    instance=None,
):
    return dg.materialize(
        EVERYTHING,
        selection=selection,
        resources=resources or default_resources(str(root)),
        tags=tags if partition_key is None else None,
        partition_key=partition_key,
        run_config=run_config,
        raise_on_error=raise_on_error,
        instance=instance,
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


def _walk_forward(root):
    """The three runs `make demo` makes: daily partitions up to the dataset, the fold assets
    over two folds, the evaluation."""
    upstream = _run(root, selection=UPSTREAM, tags=_range_tags())
    folds = _run(root, selection=FOLD_ASSETS, tags=_range_tags(*FOLDS), run_config=FOLD_CONFIG)
    evaluation = _run(root, selection=["evaluation", "latest_forecast"])
    return upstream, folds, evaluation


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph") / "data"
    return root, _walk_forward(root)


def test_every_asset_materializes_and_every_check_passes(built):
    _, runs = built
    assert all(r.success for r in runs)
    assert set().union(*(_materialized(r) for r in runs)) == ASSET_NAMES
    evaluations = runs[0].get_asset_check_evaluations()
    assert len(evaluations) == 9 and all(e.passed for e in evaluations), [
        (e.check_name, e.description) for e in evaluations if not e.passed
    ]


def test_warehouse_holds_the_whole_range(built):
    root, _ = built
    summary = Warehouse(DataPaths.at(root)).summary("ohlcv")
    btc = summary.filter(pl.col("entity") == "BTC-USD").row(0, named=True)
    assert btc["rows"] == 2192
    assert btc["first"] == datetime(2016, 1, 1) and btc["last"] == datetime(2021, 12, 31)


def test_outputs_are_in_the_lake_and_artifact_store(built):
    root, (_, folds, evaluation) = built
    paths = DataPaths.at(root)
    lake = Lake(paths.lake)
    with Warehouse(paths).connect() as con:
        for table in ("features", "labels", "training_dataset", "predictions"):
            assert lake.exists(table), table
            # the DuckDB view reads the current version only
            (n,) = con.sql(f"SELECT count(*) FROM lake_{table}").fetchall()[0]  # noqa: S608
            assert n == lake.read(table).height > 0, table
    arts = ArtifactStore(paths.artifacts)
    for fold in FOLDS:
        for kind in ("model", "predictions", *SEQUENCE_MODEL_NAMES):
            arts.verify(arts.latest(kind, fold))
        backtest = arts.latest("backtest", fold)
        assert backtest.file("equity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ev = arts.latest("evaluation", "walk_forward")
    assert "<html" in ev.file("evaluation.html").read_text()
    md = evaluation.asset_materializations_for_node("evaluation")[0].metadata
    assert md["path"].value == str(ev.path)
    assert set(md["folds"].value) == set(FOLDS)


def test_tables_and_artifacts_carry_dagsters_standard_metadata(built):
    from urllib.parse import urlparse

    from assets.ingest import TABLE_OF
    from warehouse.schema import duckdb_type

    root, (upstream, folds, evaluation) = built
    paths = DataPaths.at(root)
    lake, wh = Lake(paths.lake), Warehouse(paths)
    specs = {s.key.to_user_string(): s.metadata for s in defs().resolve_all_asset_specs()}

    def md(result, name):
        return result.asset_materializations_for_node(name)[0].metadata

    # ingest, a range run (2016...2021): the table's DuckDB name, its rows, each year's rows
    for name, table in TABLE_OF.items():
        got = md(upstream, name)
        assert got["dagster/table_name"].value == specs[name]["dagster/table_name"]
        assert got["dagster/row_count"].value == wh.count(table)
        stored = wh.read(table)
        time = "ts" if "ts" in stored.columns else "date"
        years = stored.group_by(pl.col(time).dt.year().cast(pl.String)).len()
        expected = {str(y): 0 for y in range(int(START), int(END) + 1)} | dict(years.iter_rows())
        assert got["partition_row_counts"].value == expected, name
        assert "dagster/partition_row_count" not in got  # one count would be wrong for each year
    # the lake tables: the stored frame's exact schema, its rows, a view DuckDB can query
    with wh.connect() as con:
        for name in ("features", "labels", "training_dataset"):
            got = md(upstream, name)
            stored = lake.read(name)
            schema = {c.name: c.type for c in got["dagster/column_schema"].value.columns}
            assert schema == {c: duckdb_type(t) for c, t in stored.schema.items()}, name
            declared = {c.name: c.type for c in specs[name]["dagster/column_schema"].columns}
            # the synthetic market has every declared input: the declared schema is exact
            assert schema == declared, set(schema) ^ set(declared)
            assert got["dagster/row_count"].value == stored.height
            table = got["dagster/table_name"].value
            assert con.sql(f"SELECT count(*) FROM {table}").fetchall()[0][0] == stored.height  # noqa: S608
    # artifacts: dagster/uri names a folder that exists (two folds: the kind's folder)
    arts = ArtifactStore(paths.artifacts)
    for name in FOLD_ASSETS:
        uri = md(folds, name)["dagster/uri"].value
        assert uri.startswith("file://") and Path(urlparse(uri).path).is_dir(), (name, uri)
    for name in ("model", "predictions", "backtest"):
        assert md(folds, name)["dagster/uri"].value == (arts.root / name).resolve().as_uri()
    ev = arts.latest("evaluation", "walk_forward")
    assert md(evaluation, "evaluation")["dagster/uri"].value == ev.path.resolve().as_uri()
    forecast = md(evaluation, "latest_forecast")
    assert forecast["dagster/table_name"].value == specs["latest_forecast"]["dagster/table_name"]


def test_latest_forecast_of_the_newest_model_reaches_the_newest_bar_of_every_symbol(built):
    root, (_, _, evaluation) = built
    md = evaluation.asset_materializations_for_node("latest_forecast")[0].metadata
    arts = ArtifactStore(DataPaths.at(root).artifacts)
    assert md["model_version"].value == arts.latest("mamba2", FOLDS[-1]).version
    assert md["plot_BTC-USD"].value.startswith("![BTC-USD recent forecasts](data:image/png")
    stored = Warehouse(DataPaths.at(root)).read("forecasts")
    bars = Warehouse(DataPaths.at(root)).summary("ohlcv")
    newest = stored.group_by("symbol").agg(pl.col("as_of").max()).sort("symbol")
    assert newest.rows() == bars.select("entity", "last").sort("entity").rows()
    # probabilities of a distribution, an ordered band, a positive sigma
    assert ((stored["p_down"] + stored["p_flat"] + stored["p_up"] - 1).abs() < 1e-5).all()
    assert (stored["q10"] < stored["q90"]).all() and (stored["sigma"] > 0).all()


def test_evaluation_scores_every_target_for_every_forecaster_on_the_same_test_rows(built):
    root, _ = built
    arts = ArtifactStore(DataPaths.at(root).artifacts)
    results = json.loads(
        arts.latest("evaluation", "walk_forward").file("evaluation.json").read_text()
    )
    assert results["folds"] == list(FOLDS)
    first_test = datetime(int(FOLDS[0]), 1, 1)
    for name in ("direction_90", "quantiles_90", "sigma_30", "returns_1", "returns_30"):
        r = results["targets"][name]
        assert r["rows"] > 100, name
        assert r["period"][0] >= f"{first_test:%Y-%m-%d}"
        assert {
            "mamba2",
            "lightgbm",
            "ensemble",
            "ensemble_equal",
            "rf_xgb_lstm",
            "rf_xgb_lstm_equal",
            "random_forest",
            "xgboost",
            *SEQUENCE_MODEL_NAMES,
        } <= set(r["metrics"])
        assert set(r["mcs"]["pvalues"]) == set(r["metrics"])
        assert {c["baseline"] for c in r["comparisons"] if c["model"] == "mamba2"} == set(
            r["metrics"]
        ) - {"mamba2"}
        assert len(r["seeds"]["mamba2"]["seeds"]) == 2
    # the neural models are compared at matched sizes: every count within 10% of Mamba2's
    sizes = results["parameters"]
    assert set(SEQUENCE_MODEL_NAMES) <= set(sizes)
    target = sizes["mamba2"]["max"]
    for name in SEQUENCE_MODEL_NAMES:
        assert abs(sizes[name]["max"] / target - 1) < 0.1, (name, sizes[name], target)
    direction = results["targets"]["direction_90"]
    assert {"climatology", "persistence", "zero_return"} <= set(direction["metrics"])
    sigma = results["targets"]["sigma_30"]
    assert {"ewma", "garch", "har"} <= set(sigma["metrics"])
    assert (
        "non_overlapping" in direction and "non_overlapping" not in results["targets"]["returns_1"]
    )


def test_report_points_at_the_results(built):
    root, _ = built
    text = report(str(root))
    assert "direction_90" in text and "climatology" in text and "evaluation.html" in text


def test_no_prediction_row_lies_inside_or_within_the_purge_of_its_models_training_window(built):
    """For every fold and every model artifact, the fold recorded in the artifact's manifest
    is what the test checks against: each predicted test row lies in the test window, after the
    last bar any training or validation label looked at (plus the embargo)."""
    root, _ = built
    paths = DataPaths.at(root)
    arts, lake = ArtifactStore(paths.artifacts), Lake(paths.lake)
    data = lake.read("training_dataset")
    for key in FOLDS:
        preds = pl.read_parquet(arts.latest("predictions", key).file("predictions.parquet"))
        for kind in ("model", *SEQUENCE_MODEL_NAMES):
            art = arts.latest(kind, key)
            fold = Fold.from_json(art.manifest["metadata"]["fold"])
            rows = assign_fold(data, fold)
            fitted = rows.filter(pl.col("split").is_in([TRAIN, VAL]))
            test = preds.filter(pl.col("split") == TEST)
            assert test.height > 0
            assert test["ts"].min() >= fold.test_start and test["ts"].max() < fold.test_end
            # every label window of a training or validation row ends before the test rows
            last_seen = fitted["label_end_ts"].max()
            assert last_seen + fold.embargo < test["ts"].min(), (kind, key)
            train = rows.filter(pl.col("split") == TRAIN)
            assert train["label_end_ts"].max() < fold.fit_end
            # and no predicted row is a training or validation row of its own model
            overlap = test.join(fitted, on=["symbol", "ts"], how="inner")
            assert overlap.is_empty(), (kind, key)


def test_rematerializing_a_partition_or_the_range_keeps_row_counts(built):
    root, _ = built
    wh = Warehouse(DataPaths.at(root))
    before = {t: wh.count(t) for t in ("ohlcv", "onchain", "macro")}
    ingest = dg.AssetSelection.groups("ingest")
    assert _run(root, selection=ingest, partition_key="2020").success
    assert _run(root, selection=ingest, tags=_range_tags("2019", "2019")).success
    assert {t: wh.count(t) for t in before} == before


def test_rerunning_a_fold_reuses_the_identical_artifact_versions(built):
    root, _ = built
    arts = ArtifactStore(DataPaths.at(root).artifacts)
    before = {k: arts.latest(k, FOLDS[-1]).version for k in ("model", "mamba2", "predictions")}
    result = _run(root, selection=FOLD_ASSETS, partition_key=FOLDS[-1], run_config=FOLD_CONFIG)
    assert result.success
    assert {k: arts.latest(k, FOLDS[-1]).version for k in before} == before
    assert len(arts.list("model", FOLDS[-1])) == 1


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
    with dg.DagsterInstance.ephemeral() as instance:
        result = _run(
            root,
            selection=UPSTREAM,
            tags=_range_tags("2019", "2019"),
            resources=resources,
            raise_on_error=False,
            instance=instance,
        )
        records = instance.get_records_for_run(
            result.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ).records
    assert not result.success
    checks = {
        e.asset_check_evaluation.check_name: e.asset_check_evaluation
        for e in (r.event_log_entry for r in records)
    }
    # the ingest's audit of its staged write failed ohlcv_quality before anything was published
    assert not checks["ohlcv_quality"].passed
    assert "rolled back" in checks["ohlcv_quality"].description
    assert "column_B=low" in checks["ohlcv_quality"].description
    assert checks["macro_quality"].passed
    done = _materialized(result)
    assert {"onchain_metrics", "macro_series"} <= done and "ohlcv_bars" not in done
    assert Warehouse(DataPaths.at(root)).count("ohlcv") == 0
    assert not done & {"features", "labels", "training_dataset", "model", "mamba_model", "backtest"}
    assert not Lake(DataPaths.at(root).lake).exists("features")


def test_an_unknown_symbol_fails_the_run_before_anything_is_written(tmp_path):
    root = tmp_path / "data"
    resources = {
        **default_resources(str(root)),
        "sources": MarketSourcesResource(symbols=["BTC-USD", "NOPE"]),
    }
    with pytest.raises(Exception) as failure:
        _run(
            root,
            selection=UPSTREAM,
            tags=_range_tags("2019", "2019"),
            resources=resources,
        )
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
                "config": {
                    "ohlcv_source": "file",
                    "ohlcv_path": str(path),
                    "symbols": ["BTC-USD"],
                    "until": "2021-01-03",
                }
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
        partition_key="2021",
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
        _run(root, selection=["macro_series"], partition_key="2020", resources=resources)
    assert "ended mid-record" in _messages(failure.value)
    assert wh.read("macro").equals(before)


def test_the_mamba2_artifact_reloads_and_reproduces_its_predictions(built):
    root, _ = built
    paths = DataPaths.at(root)
    art = ArtifactStore(paths.artifacts).latest("mamba2", FOLDS[-1])
    cfg_json = json.loads(art.file("config.json").read_text())
    lake = Lake(paths.lake)
    meta = lake.read_meta("training_dataset")
    fold = Fold.from_json(art.manifest["metadata"]["fold"])
    data = lake.read("training_dataset")
    targets = TargetSpec.from_label_config(LabelConfig.from_dict(meta["label_config"]))
    fd = fold_data(data, data, fold, meta["feature_columns"], targets)
    # another chunking than training used: the carried state makes it the same forecast
    f = SequenceForecaster("mamba2", 0, SequenceSettings(tbptt_len=97))
    f.model = f.build(fd)
    f.model.load_state_dict(torch.load(art.file("weights_seed0.pt"), weights_only=True)["model"])
    f.scaler = Standardizer.from_json(art.file("scaler.json").read_text())
    assert cfg_json["seeds"] == [0, 1]
    again = f.predict(fd)
    saved = pl.read_parquet(art.file("predictions.parquet")).filter(pl.col("seed") == 0)
    assert again.height == saved.height
    assert np.allclose(again["p_up"], saved["p_up"], atol=1e-5)


def test_feature_and_label_versions_name_their_parquet_paths(built):
    root, (result, _, _) = built
    lake = Lake(DataPaths.at(root).lake)
    for node, key, version in (
        ("features", "feature_version", FeatureConfig().version()),
        ("labels", "label_version", LabelConfig().version()),
    ):
        md = result.asset_materializations_for_node(node)[0].metadata
        assert md[key].value == version == lake.current_version(node)
        # the committed write folder of that version: version=<v>/<write id>
        assert Path(md["path"].value).parent.name == f"version={version}"
        assert all(f"version={version}" in str(f) for f in lake.files(node))

    default, changed = LabelConfig().version(), LabelConfig(up_threshold=0.1).version()
    assert default != changed
    run = _run(
        root,
        selection=["labels"],
        run_config={"ops": {"labels": {"config": {"up_threshold": 0.1}}}},
    )
    md = run.asset_materializations_for_node("labels")[0].metadata
    assert Path(md["path"].value).parent.name == f"version={changed}"
    assert set(lake.versions("labels")) == {default, changed}  # the old version is kept
    assert lake.read_meta("labels")["config"]["up_threshold"] == 0.1
    _run(root, selection=["labels"])  # back to the defaults: their path is current again
    assert lake.current_version("labels") == default
