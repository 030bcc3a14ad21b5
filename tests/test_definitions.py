import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

from assets.partitions import fold_partitions
from pipelines.definitions import defs
from pipelines.defs.schedules import daily_refresh_schedule, weekly_retrain_schedule

EXPECTED_GRAPH = {
    "ohlcv_bars": [],
    "onchain_metrics": [],
    "macro_series": [],
    "features": ["macro_series", "ohlcv_bars", "onchain_metrics"],
    "labels": ["ohlcv_bars"],
    "training_dataset": ["features", "labels"],
    "model": ["training_dataset"],
    "mamba_model": ["training_dataset"],
    "sequence_baselines": ["training_dataset"],
    "literature_baselines": ["training_dataset"],
    "predictions": ["literature_baselines", "mamba_model", "model", "sequence_baselines"],
    "backtest": ["predictions"],
    "evaluation": ["backtest", "predictions"],
    "latest_forecast": ["features", "labels", "mamba_model", "training_dataset"],
}
EXPECTED_GROUPS = {
    "ingest": {"ohlcv_bars", "onchain_metrics", "macro_series"},
    "features": {"features", "labels"},
    "training": {
        "training_dataset",
        "model",
        "mamba_model",
        "sequence_baselines",
        "literature_baselines",
        "predictions",
    },
    "backtest": {"backtest"},
    "evaluation": {"evaluation"},
    "forecast": {"latest_forecast"},
}
FOLD_ASSETS = {
    "model",
    "mamba_model",
    "sequence_baselines",
    "literature_baselines",
    "predictions",
    "backtest",
}
# what the assets compute with; loading the definitions (every CLI call, the forkserver of every
# run) must not pay for it
TRAINING_STACK = ("torch", "arch", "scipy", "matplotlib", "lightgbm", "sklearn", "xgboost")


def test_asset_graph_has_the_expected_keys_and_edges():
    graph = defs().resolve_asset_graph()
    got = {
        k.to_user_string(): sorted(p.to_user_string() for p in graph.get(k).parent_keys)
        for k in graph.get_all_asset_keys()
    }
    assert got == EXPECTED_GRAPH


def test_assets_are_in_their_stage_groups():
    graph = defs().resolve_asset_graph()
    groups: dict[str, set[str]] = {}
    for key in graph.get_all_asset_keys():
        groups.setdefault(graph.get(key).group_name, set()).add(key.to_user_string())
    assert groups == EXPECTED_GROUPS


def test_ingest_assets_are_yearly_partitioned_from_1960_with_single_run_backfills():
    graph = defs().resolve_asset_graph()
    for name in EXPECTED_GROUPS["ingest"]:
        node = graph.get(dg.AssetKey(name))
        keys = node.partitions_def.get_partition_keys(
            current_time=datetime(2026, 12, 1, tzinfo=UTC)
        )
        # the whole history users have (FRED from 1962, Bitstamp from 2011) through this year
        assert keys[0] == "1960" and keys[-1] == "2026" and len(keys) == 67
        assert node.backfill_policy == dg.BackfillPolicy.single_run()
        assert node.pools == {"duckdb_writer"}  # one DuckDB writer at a time, across runs
        # fresh by 03:00 UTC after the 01:00 refresh
        policy = node.freshness_policy
        assert policy.deadline_cron == "0 3 * * *" and policy.lower_bound_delta.seconds == 7200
    for name in FOLD_ASSETS:
        node = graph.get(dg.AssetKey(name))
        assert node.partitions_def == fold_partitions, name
        assert node.backfill_policy == dg.BackfillPolicy.single_run()
    for name in set(EXPECTED_GRAPH) - EXPECTED_GROUPS["ingest"] - FOLD_ASSETS:
        node = graph.get(dg.AssetKey(name))
        assert node.partitions_def is None
        # so it can run in a partition-range run after the partitioned assets (the demo's)
        assert node.backfill_policy == dg.BackfillPolicy.single_run(), name


def test_walk_forward_folds_are_yearly_partitions_through_the_current_year():
    keys = fold_partitions.get_partition_keys(current_time=datetime(2026, 12, 1, tzinfo=UTC))
    assert keys[0] == "2013" and keys[-1] == "2026"
    assert "holdout" not in keys


def test_quality_and_leakage_checks_are_attached_and_blocking():
    graph = defs().resolve_asset_graph()
    checks = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert checks == {
        ("ohlcv_bars", "ohlcv_quality"),
        ("onchain_metrics", "onchain_quality"),
        ("macro_series", "macro_quality"),
        ("ohlcv_bars", "ohlcv_extreme_moves"),
        ("features", "features_quality"),
        ("features", "features_truncation_invariance"),
        ("labels", "labels_alignment"),
        ("training_dataset", "training_split_hygiene"),
        ("training_dataset", "training_scalers_fit_on_train_only"),
    }
    warnings_only = {"ohlcv_extreme_moves"}  # a one-bar jump is worth a look, not a stop
    for check_def in defs().asset_checks:
        for spec in check_def.check_specs:
            assert spec.blocking == (spec.name not in warnings_only), spec.key


def test_jobs_schedules_and_resources():
    jobs = {j.name for j in defs().resolve_all_job_defs()}
    assert {"ingest_job", "features_job", "daily_refresh_job", "retrain_job"} <= jobs
    assert daily_refresh_schedule.job_name == "daily_refresh_job"
    assert daily_refresh_schedule.cron_schedule == "0 1 * * *"
    assert weekly_retrain_schedule.job_name == "retrain_job"
    assert set(defs().resources) == {"warehouse", "sources", "training_launcher", "alerts"}
    assert {s.name for s in defs().sensors} == {"run_failure_alert"}


def _range(request: dg.RunRequest) -> tuple[str, str]:
    return (
        request.tags["dagster/asset_partition_range_start"],
        request.tags["dagster/asset_partition_range_end"],
    )


def _tick(instance, when: datetime):
    ctx = dg.build_schedule_context(instance=instance, scheduled_execution_time=when)
    return daily_refresh_schedule.evaluate_tick(ctx)


def _ingested(instance, partitions: dict[str, str]) -> None:
    for asset, key in partitions.items():
        instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=key))


def test_daily_refresh_runs_yesterdays_year_incrementally_and_catches_up_across_new_year(tmp_path):
    # a throwaway instance of its own: instance_for_test leaves DAGSTER_HOME-bound state behind
    # that breaks later in-process materializations in the same test process
    ingest = ("ohlcv_bars", "onchain_metrics", "macro_series")
    with dg.DagsterInstance.local_temp(str(tmp_path)) as instance:
        # nothing ingested yet: a refresh would fetch one year only; it asks for the backfill
        skipped = _tick(instance, datetime(2024, 5, 10, 1, 0, tzinfo=UTC))
        assert not skipped.run_requests and "backfill the history first" in skipped.skip_message
        # keys of the former daily partitioning are ignored, not parsed as years
        _ingested(instance, dict.fromkeys(ingest, "2024-03-05"))
        assert _tick(instance, datetime(2024, 5, 10, 1, 0, tzinfo=UTC)).skip_message
        _ingested(instance, dict.fromkeys(ingest, "2024") | {"ohlcv_bars": "2023"})
        _ingested(instance, {"ohlcv_bars": "2024"})
        (request,) = _tick(instance, datetime(2024, 5, 10, 1, 0, tzinfo=UTC)).run_requests
        assert _range(request) == ("2024", "2024")
        assert request.run_config == {
            "ops": {a: {"config": {"incremental": True}} for a in ingest},
            "execution": {"config": {"in_process": True}},  # a refresh runs in one process
        }
        assert request.run_key == "refresh-2024-05-10"
        # on 1 January the new days are last year's
        (request,) = _tick(instance, datetime(2025, 1, 1, 1, 0, tzinfo=UTC)).run_requests
        assert _range(request) == ("2024", "2024")
        # a year later (the daemon was down over new year): from the newest year ingested of the
        # asset that lags most, through this one
        (request,) = _tick(instance, datetime(2025, 1, 20, 1, 0, tzinfo=UTC)).run_requests
        assert _range(request) == ("2024", "2025")
        # a re-run of an old year does not drag the refresh back to it
        _ingested(instance, {"macro_series": "2015"})
        (request,) = _tick(instance, datetime(2025, 1, 20, 1, 0, tzinfo=UTC)).run_requests
        assert _range(request) == ("2024", "2025")
        # after a failed blocking check the years are re-fetched whole, not incrementally
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey("ohlcv_bars"),
                check_name="ohlcv_quality",
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
            )
        )
        (request,) = _tick(instance, datetime(2025, 1, 21, 1, 0, tzinfo=UTC)).run_requests
        assert request.run_config == {"execution": {"config": {"in_process": True}}}
        assert "ohlcv_bars:ohlcv_quality" in request.tags["mambacast/refresh"]
    job = defs().resolve_job_def("daily_refresh_job")
    selected = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert selected == EXPECTED_GROUPS["ingest"] | EXPECTED_GROUPS["features"] | {"latest_forecast"}


def test_weekly_retrain_requests_the_current_fold():
    ctx = dg.build_schedule_context(
        scheduled_execution_time=datetime(2024, 5, 12, 3, 0, tzinfo=UTC)
    )
    assert weekly_retrain_schedule(ctx).partition_key == "2024"


def _python(code: str, timeout: float = 180):
    """Run `code` in a fresh interpreter in the project folder; the JSON its last line prints."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loading_the_definitions_imports_no_training_stack():
    # what every CLI call, code server and forkserver does: build defs() (every asset module)
    code = (
        "import json, sys; from pipelines.definitions import defs; defs(); "
        f"print(json.dumps([m for m in {TRAINING_STACK!r} if m in sys.modules]))"
    )
    assert _python(code) == []


# -- the dg project: autoloading, no hand-kept lists, the preloaded forkserver ------------------
def test_a_new_asset_module_is_in_the_graph_by_being_in_the_assets_package(tmp_path):
    # a module dropped into the package (here: a folder added to the package's path, so the
    # checkout stays untouched) is loaded with its asset and its check, no list edited
    (tmp_path / "probe_asset.py").write_text(
        "import dagster as dg\n"
        "@dg.asset(group_name='probe')\n"
        "def probe_table():\n"
        "    return None\n"
        "@dg.asset_check(asset=probe_table)\n"
        "def probe_check():\n"
        "    return dg.AssetCheckResult(passed=True)\n"
    )
    code = (
        "import json, assets; "
        f"assets.__path__.append({str(tmp_path)!r}); "
        "from pipelines.definitions import defs; "
        "g = defs().resolve_asset_graph(); "
        "print(json.dumps([sorted(k.to_user_string() for k in g.get_all_asset_keys()), "
        "sorted(k.to_user_string() for k in g.asset_check_keys)]))"
    )
    keys, checks = _python(code)
    assert set(keys) == {*EXPECTED_GRAPH, "probe_table"}
    assert "probe_table:probe_check" in checks


def test_jobs_schedules_sensors_and_resources_come_from_the_defs_folder():
    from pipelines.defs import jobs, resources, schedules, sensors

    def names(module, kind):
        return {v.name for v in vars(module).values() if isinstance(v, kind)}

    job_kinds = (dg.JobDefinition, type(jobs.ingest_job))  # define_asset_job's unresolved job
    loaded = defs()
    assert {j.name for j in loaded.jobs} == names(jobs, job_kinds) != set()
    assert {s.name for s in loaded.schedules} == names(schedules, dg.ScheduleDefinition) != set()
    assert {s.name for s in loaded.sensors} == names(sensors, dg.SensorDefinition) != set()
    assert set(loaded.resources) == set(resources.default_resources())
    # each module holds its own kind only (imports are of modules, so nothing is loaded twice)
    assert names(schedules, job_kinds) == names(jobs, dg.ScheduleDefinition) == set()


def test_the_code_location_module_keeps_no_list_of_assets_or_checks():
    import pipelines.definitions as module

    for name, value in vars(module).items():
        assert not isinstance(value, dg.AssetsDefinition | dg.AssetChecksDefinition), name
        if type(value) in (list, tuple):
            assert not any(
                isinstance(v, dg.AssetsDefinition | dg.AssetChecksDefinition) for v in value
            ), name


def test_the_forkserver_preloads_every_asset_module_and_builds_the_definitions_once():
    from pipelines.definitions import MULTIPROCESS

    preload = MULTIPROCESS["start_method"]["forkserver"]["preload_modules"]
    root = Path(__file__).resolve().parents[1]
    on_disk = {f"assets.{p.stem}" for p in (root / "assets").glob("*.py") if p.stem != "__init__"}
    on_disk |= {f"pipelines.defs.{p.stem}" for p in (root / "pipelines" / "defs").glob("*.py")} - {
        "pipelines.defs.__init__"
    }
    assert on_disk <= set(preload)
    assert preload.index("pipelines.preload") > max(preload.index(m) for m in on_disk)
    # what the forkserver does: import the preload modules in order; a step's load is then a hit
    code = (
        "import importlib, json; "
        f"[importlib.import_module(m) for m in {preload!r}]; "
        "import pipelines.definitions as d; "
        "before = d.project_definitions.cache_info(); d.defs(); "
        "after = d.project_definitions.cache_info(); "
        "print(json.dumps([before.currsize, after.hits - before.hits, after.misses - before.misses]))"
    )
    assert _python(code) == [1, 1, 0]


# -- Dagster's standard metadata on the definitions --------------------------------------------
TABLE_ASSETS = {
    "ohlcv_bars": "ohlcv",
    "onchain_metrics": "onchain",
    "macro_series": "macro",
    "latest_forecast": "forecasts",
    "features": "lake_features",
    "labels": "lake_labels",
    "training_dataset": "lake_training_dataset",
}


def test_every_table_asset_declares_its_columns_and_table_name():
    from ml.features import FeatureConfig, feature_schema
    from ml.labels import LabelConfig, label_schema
    from warehouse.schema import TABLES, duckdb_type

    specs = {s.key.to_user_string(): s for s in defs().resolve_all_asset_specs()}
    declared = {
        name: spec.metadata
        for name, spec in specs.items()
        if "dagster/column_schema" in spec.metadata
    }
    assert set(declared) == set(TABLE_ASSETS)
    for name, table in TABLE_ASSETS.items():
        md = declared[name]
        assert md["dagster/table_name"] == f"warehouse.main.{table}"
        columns = {c.name: c for c in md["dagster/column_schema"].columns}
        expected = (
            TABLES[table].columns
            if table in TABLES
            else {
                "lake_features": feature_schema(FeatureConfig()),
                "lake_labels": label_schema(LabelConfig()),
            }.get(table)
        )
        if expected is None:  # the dataset: the bar, every candidate model column, the labels
            assert {"symbol", "ts", "close", "log_ret_1", "fwd_ret_90"} <= set(columns)
            continue
        assert {c: col.type for c, col in columns.items()} == {
            c: duckdb_type(t) for c, t in expected.items()
        }, name
        key = TABLES[table].key if table in TABLES else ("symbol", "ts")
        assert {c for c, col in columns.items() if not col.constraints.nullable} == set(key)


def test_a_reload_of_the_component_tree_keeps_every_asset_and_check():
    # Dagster's code servers can rebuild a location from its component tree (reload with
    # state): the assets and checks are inside the defs folder, so they survive it
    loaded = defs()
    reloaded = loaded.get_repository_def().get_component_tree().reload_with_state([])
    graph, again = loaded.resolve_asset_graph(), reloaded.resolve_asset_graph()
    assert again.get_all_asset_keys() == graph.get_all_asset_keys()
    assert again.asset_check_keys == graph.asset_check_keys
    assert {j.name for j in reloaded.jobs} == {j.name for j in loaded.jobs}
