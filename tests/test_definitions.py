from datetime import UTC, datetime

import dagster as dg

from assets.partitions import fold_partitions
from pipelines.definitions import daily_refresh_schedule, defs, weekly_retrain_schedule

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
    "predictions": ["mamba_model", "model", "sequence_baselines"],
    "backtest": ["predictions"],
    "evaluation": ["backtest", "predictions"],
}
EXPECTED_GROUPS = {
    "ingest": {"ohlcv_bars", "onchain_metrics", "macro_series"},
    "features": {"features", "labels"},
    "training": {"training_dataset", "model", "mamba_model", "sequence_baselines", "predictions"},
    "backtest": {"backtest"},
    "evaluation": {"evaluation"},
}
FOLD_ASSETS = {"model", "mamba_model", "sequence_baselines", "predictions", "backtest"}


def test_asset_graph_has_the_expected_keys_and_edges():
    graph = defs.resolve_asset_graph()
    got = {
        k.to_user_string(): sorted(p.to_user_string() for p in graph.get(k).parent_keys)
        for k in graph.get_all_asset_keys()
    }
    assert got == EXPECTED_GRAPH


def test_assets_are_in_their_stage_groups():
    graph = defs.resolve_asset_graph()
    groups: dict[str, set[str]] = {}
    for key in graph.get_all_asset_keys():
        groups.setdefault(graph.get(key).group_name, set()).add(key.to_user_string())
    assert groups == EXPECTED_GROUPS


def test_ingest_assets_are_daily_partitioned_with_single_run_backfills():
    graph = defs.resolve_asset_graph()
    for name in EXPECTED_GROUPS["ingest"]:
        node = graph.get(dg.AssetKey(name))
        assert isinstance(node.partitions_def, dg.DailyPartitionsDefinition)
        assert node.backfill_policy == dg.BackfillPolicy.single_run()
    for name in FOLD_ASSETS:
        node = graph.get(dg.AssetKey(name))
        assert node.partitions_def == fold_partitions, name
        assert node.backfill_policy == dg.BackfillPolicy.single_run()
    for name in set(EXPECTED_GRAPH) - EXPECTED_GROUPS["ingest"] - FOLD_ASSETS:
        assert graph.get(dg.AssetKey(name)).partitions_def is None


def test_walk_forward_folds_are_yearly_partitions_through_the_current_year():
    keys = fold_partitions.get_partition_keys(current_time=datetime(2026, 12, 1, tzinfo=UTC))
    assert keys[0] == "2013" and keys[-1] == "2026"
    assert "holdout" not in keys


def test_quality_and_leakage_checks_are_attached_and_blocking():
    graph = defs.resolve_asset_graph()
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
    for check_def in defs.asset_checks:
        for spec in check_def.check_specs:
            assert spec.blocking == (spec.name not in warnings_only), spec.key


def test_jobs_schedules_and_resources():
    jobs = {j.name for j in defs.resolve_all_job_defs()}
    assert {"ingest_job", "features_job", "daily_refresh_job", "retrain_job"} <= jobs
    assert daily_refresh_schedule.job_name == "daily_refresh_job"
    assert daily_refresh_schedule.cron_schedule == "0 1 * * *"
    assert weekly_retrain_schedule.job_name == "retrain_job"
    assert set(defs.resources) == {"warehouse", "sources", "pipes_subprocess_client"}


def test_daily_refresh_runs_yesterdays_partition():
    ctx = dg.build_schedule_context(
        scheduled_execution_time=datetime(2024, 5, 10, 1, 0, tzinfo=UTC)
    )
    result = daily_refresh_schedule.evaluate_tick(ctx)
    assert [r.partition_key for r in result.run_requests] == ["2024-05-09"]
    job = defs.resolve_job_def("daily_refresh_job")
    selected = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert selected == EXPECTED_GROUPS["ingest"] | EXPECTED_GROUPS["features"]


def test_weekly_retrain_requests_the_current_fold():
    ctx = dg.build_schedule_context(
        scheduled_execution_time=datetime(2024, 5, 12, 3, 0, tzinfo=UTC)
    )
    assert weekly_retrain_schedule(ctx).partition_key == "2024"
