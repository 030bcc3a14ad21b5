"""Leakage checks: each planted leak fails its check; the clean pipeline passes them all."""

import shutil
from datetime import date, datetime, timedelta

import dagster as dg
import numpy as np
import polars as pl
import pytest

import assets.features as asset_features
import ml.features as ml_features
from assets.features import features, labels
from assets.ingest import INGEST_ASSETS
from assets.leakage import LEAKAGE_CHECKS
from assets.quality import QUALITY_CHECKS
from assets.training import training_dataset
from ml.dataset import TRAIN, Standardizer
from ml.features import FeatureConfig, compute_features, model_feature_columns
from ml.labels import LabelConfig, compute_labels, label_columns
from ml.leakage import (
    check_fit_independence,
    check_label_alignment,
    check_scaler_matches_training_rows,
    check_split_hygiene,
    check_truncation_invariance,
    default_cuts,
    truncate_raw,
)
from ml.walkforward import WalkForwardConfig, assign_fold, fold_for_key
from pipelines.defs.resources import default_resources
from warehouse.sources import make_source

COLS = model_feature_columns(FeatureConfig())
START, END = datetime(2018, 1, 1), datetime(2020, 1, 1)
COMPUTE_FEATURES = compute_features  # the real one, before any monkeypatching


@pytest.fixture(scope="module")
def raw(synthetic_ohlcv, synthetic_onchain, synthetic_macro):
    return (
        synthetic_ohlcv.filter(pl.col("ts").is_between(START, END, closed="left")),
        synthetic_onchain.filter(pl.col("date").is_between(START.date(), END.date())),
        synthetic_macro.filter(pl.col("date") < END.date()),
    )


@pytest.fixture(scope="module")
def dataset(raw):
    feats = compute_features(*raw)
    labs = compute_labels(raw[0])
    rows = feats.join(labs, on=["symbol", "ts"]).drop_nulls(["log_ret_90"]).sort(["symbol", "ts"])
    # a short validation window: the raw data covers two years
    fold = fold_for_key("2019", WalkForwardConfig(val_days=100), rows["ts"].min())
    return rows, fold


def _future_return(o, c, m, *cfg):
    """A feature built from a future row: log_ret_1 replaced by the next bar's return."""
    f = COMPUTE_FEATURES(o, c, m, *cfg)
    return f.with_columns(
        log_ret_1=(pl.col("log_close").shift(-1) - pl.col("log_close")).over("symbol")
    )


def _macro_by_observation_date(o, c, m):
    """Macro values forward-filled from their observation date, before they were published."""
    return COMPUTE_FEATURES(o, c, m.with_columns(published=pl.col("date")))


def test_clean_features_are_truncation_invariant(raw):
    report = check_truncation_invariance(*raw, COMPUTE_FEATURES, COLS)
    assert report.passed, report.summary()
    assert report.checked > 1000


def test_a_feature_from_a_future_row_fails_truncation_invariance(raw):
    report = check_truncation_invariance(*raw, _future_return, COLS)
    assert not report.passed
    assert set(report.offending["column"]) == {"log_ret_1"}
    # the offending rows are the last bar before each cut, whose next bar was cut off
    for cut, ts in report.offending.select("cut", "ts").iter_rows():
        assert ts == cut - timedelta(days=1) or ts.weekday() == 4
    assert "log_ret_1" in report.summary()


def test_a_macro_value_used_before_publication_fails_truncation_invariance(raw):
    report = check_truncation_invariance(*raw, _macro_by_observation_date, COLS)
    assert not report.passed
    assert set(report.offending["column"]) <= {
        c for s in ml_features.MACRO_SERIES for c in COLS if c.startswith(s)
    }
    assert "truncation_invariance" in report.summary()


def _onchain_same_day(o, c, m):
    """The on-chain leak: day d's totals used at bar d, before the day is over (the rule uses
    them from bar d + 1 on): every on-chain row moved one day earlier inside the feature code."""
    return COMPUTE_FEATURES(o, c.with_columns(date=pl.col("date") - pl.duration(days=1)), m)


def test_onchain_leak_same_day_totals_fail_truncation_invariance(raw):
    """The checker's on-chain cut must be strict (days complete before the cut's previous day):
    with `date < day` in ml.leakage.truncate_raw the truncated run keeps the same day too and
    this planted leak passes (issue 15, finding 2)."""
    report = check_truncation_invariance(*raw, _onchain_same_day, COLS)
    assert not report.passed, report.summary()
    onchain_cols = set(ml_features.onchain_feature_columns(FeatureConfig()))
    onchain_cols.add(ml_features.ONCHAIN_AGE_COLUMN)
    changed = set(report.offending["column"])
    assert changed and changed <= {c for c in COLS if c in onchain_cols or "active_addresses" in c}
    # the offending bars are the last ones before each cut, whose day's totals were cut off
    for cut, ts in report.offending.select("cut", "ts").iter_rows():
        assert cut - timedelta(days=3) <= ts < cut


def test_a_stored_snapshot_is_checked_against_the_truncated_recomputation(raw):
    """With `stored`, the left side is the stored snapshot: a clean one (as read back from
    Parquet, EWMAs seeded at the start of the history) passes; one with a future return added
    to a column, in code ml.features never runs, fails naming the column and its first rows."""
    stored = COMPUTE_FEATURES(*raw)
    clean = check_truncation_invariance(*raw, COMPUTE_FEATURES, COLS, stored=stored)
    assert clean.passed, clean.summary()
    assert clean.checked > 1000 and "stored features" in clean.rule
    nxt = (pl.col("log_close").shift(-1) - pl.col("log_close")).over("symbol").fill_null(0.0)
    leaky = stored.with_columns(log_ret_5=pl.col("log_ret_5") + nxt)
    report = check_truncation_invariance(*raw, COMPUTE_FEATURES, COLS, stored=leaky)
    assert not report.passed
    assert set(report.offending["column"]) == {"log_ret_5"}
    assert {"stored_value", "truncated_value"} <= set(report.offending.columns)
    first = report.offending["ts"].min()
    assert f"log_ret_5 at {first}" in report.summary()
    assert "do not train on this snapshot" in report.summary()


def test_stored_features_leak_on_the_newest_rows_or_in_the_prices_fails(raw):
    """Rows after the last cut (the newest fold's test window, what live forecasts read) and the
    prices the dataset copies from the snapshot are compared too; an infinite value is a
    difference, not a match."""
    stored = COMPUTE_FEATURES(*raw)
    newest = stored["ts"].max() - timedelta(days=20)
    nxt = (pl.col("log_close").shift(-1) - pl.col("log_close")).over("symbol").fill_null(0.0)
    late = stored.with_columns(
        log_ret_5=pl.when(pl.col("ts") > newest)
        .then(pl.col("log_ret_5") + nxt)
        .otherwise(pl.col("log_ret_5"))
    )
    report = check_truncation_invariance(*raw, COMPUTE_FEATURES, COLS, stored=late)
    assert not report.passed
    assert report.offending["ts"].min() > newest
    assert "all the data" in report.summary() and "do not train" in report.summary()
    # the close the backtest trades on, moved to the next bar's
    priced = stored.with_columns(close=pl.col("close").shift(-1).over("symbol").fill_null(1.0))
    report = check_truncation_invariance(*raw, COMPUTE_FEATURES, ["close", *COLS], stored=priced)
    assert not report.passed and set(report.offending["column"]) == {"close"}
    # an infinite stored value where the code computes a finite one
    infinite = stored.with_columns(
        log_ret_5=pl.when(pl.col("ts") == newest).then(float("inf")).otherwise("log_ret_5")
    )
    report = check_truncation_invariance(*raw, COMPUTE_FEATURES, COLS, stored=infinite)
    assert not report.passed and set(report.offending["column"]) == {"log_ret_5"}


def _plain_shift_change(one, w):
    """The macro change as it was before features code 5: a shift over observation dates."""
    return one["value"] - one["value"].shift(w)


def test_a_macro_change_over_a_late_released_observation_is_a_macro_late_release_leak(
    raw, monkeypatch
):
    """An observation first released late (ALFRED: first published as missing, filled in later)
    must not enter the change of a newer observation published before it."""
    o, c, m = raw
    late = (pl.col("series") == "DGS10") & (pl.col("date") == datetime(2019, 6, 3).date())
    assert m.filter(late).height == 1
    m = m.with_columns(
        published=pl.when(late).then(datetime(2019, 6, 20).date()).otherwise("published")
    )
    cut = [datetime(2019, 6, 12)]  # after Monday 10 June is published, before 3 June is
    clean = check_truncation_invariance(o, c, m, COMPUTE_FEATURES, COLS, cuts=cut)
    assert clean.passed, clean.summary()
    monkeypatch.setattr(ml_features, "_change_as_published", _plain_shift_change)
    report = check_truncation_invariance(o, c, m, COMPUTE_FEATURES, COLS, cuts=cut)
    assert not report.passed
    assert set(report.offending["column"]) == {"DGS10_chg_5"}
    # the bars after 3 June's usual publication, up to the cut: the plain shift counts 3 June
    # among the five earlier observations of the changes published then (10 June's is from it)
    offending_days = set(report.offending["ts"].dt.date())
    assert datetime(2019, 6, 11).date() in offending_days
    assert min(offending_days) > datetime(2019, 6, 3).date()


def _macro_oracle(obs: dict, t, w: int, limit: int):
    """Brute force over one series {observed: (published, value)} at publication day t: the
    newest observation published by t (None past the staleness limit), its value, its change
    against the `w`-th earlier observation published by its own publication day, and its age."""
    known = [d for d, (pub, _) in obs.items() if pub <= t]
    if not known:
        return None, None, None
    current = max(known)
    pub, value = obs[current]
    if (t - pub).days > limit:
        return None, None, None
    earlier = sorted(d for d, (p, _) in obs.items() if d < current and p <= pub)
    change = value - obs[earlier[-w]][1] if len(earlier) >= w else None
    return value, change, (t - pub).days


def _bars(days) -> pl.DataFrame:
    return (
        make_source("ohlcv", "synthetic", symbols=("BTC-USD",))
        .fetch(
            datetime.combine(min(days), datetime.min.time()),
            datetime.combine(max(days), datetime.min.time()) + timedelta(days=1),
        )
        .filter(pl.col("ts").dt.date().is_in(days))
    )


def test_macro_values_and_changes_use_only_observations_public_at_the_time(synthetic_onchain):
    """Against the brute force on every bar date, for hand-made late releases and for seeded
    random publication patterns over three series: releases a day late, weekly batches whose
    predecessor comes later, same-day ties, missing values, short series. Then the same rows
    cut at every publication day equal the full-data rows (truncation invariance)."""
    cfg = FeatureConfig()
    w, limit = cfg.macro_change_window, cfg.macro_max_staleness_days
    days = [date(2020, 1, 1) + timedelta(days=i) for i in range(70)]
    observed = [d for d in days if d.weekday() < 5][:40]
    hand = {d: d + timedelta(days=1) for d in observed}
    hand[observed[12]] += timedelta(days=12)  # first released late, mid-week
    hand[observed[20]] = observed[26] + timedelta(days=2)  # late, on the day of a newer one
    for d in observed[30:35]:  # a weekly batch
        hand[d] = observed[35]
    hand[observed[37]] = observed[-1] + timedelta(days=13)  # late, after the series went stale
    rng = np.random.default_rng(15)
    patterns = {"X": hand}
    for name, n in (("A", 45), ("B", 30), ("C", 4)):
        pub = {}
        for i, d in enumerate(observed[:n]):
            lag = int(rng.choice([1, 1, 1, 2, 3, 8, 20], p=[0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05]))
            pub[d] = d + timedelta(days=lag)
            if i % 9 == 4:  # a batch published with its successor
                pub[d] = max(pub[d], d + timedelta(days=5))
        patterns[name] = pub
    rows = []
    for name, pub in patterns.items():
        for i, d in enumerate(sorted(pub)):
            value = None if name == "A" and i % 11 == 3 else float((i * 7) % 11 + i)
            rows.append((name, d, value, pub[d]))
    macro = pl.DataFrame(
        rows, schema=["series", "date", "value", "published"], orient="row"
    ).sample(fraction=1.0, shuffle=True, seed=3)  # no row order to rely on
    bars = _bars(days)
    got = compute_features(bars, synthetic_onchain, macro, cfg).with_columns(
        day=pl.col("ts").dt.date()
    )
    assert got.height == len(days)
    late = 0
    for name in patterns:
        obs = {d: (p, v) for n, d, v, p in rows if n == name and v is not None}
        order = sorted(obs)
        for row in got.iter_rows(named=True):
            t = row["day"]
            want = _macro_oracle(obs, t, w, limit)
            assert (row[name], row[f"{name}_chg_{w}"], row[f"{name}_age_days"]) == want, (name, t)
            if want[0] is not None:  # a plain shift over observation dates would read later
                current = max(d for d in obs if obs[d][0] <= t)
                i = order.index(current)
                late += any(obs[d][0] > obs[current][0] for d in order[max(0, i - w) : i])
    assert late >= 20
    # a late observation published after the series went stale does not revive it
    stale = got.filter(pl.col("day") == observed[-1] + timedelta(days=13))
    assert stale["X"].to_list() == [None]
    cuts = sorted({p for pub in patterns.values() for p in pub.values() if p <= days[-1]})
    report = check_truncation_invariance(
        bars,
        synthetic_onchain,
        macro,
        COMPUTE_FEATURES,
        [c for c in got.columns if c.split("_")[0] in patterns],
        cuts=[datetime.combine(c, datetime.min.time()) for c in cuts],
    )
    assert report.passed, report.summary()
    # before features code 5, a late observation entered newer changes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ml_features, "_change_as_published", _plain_shift_change)
        old = compute_features(bars, synthetic_onchain, macro, cfg)
    assert not old["X_chg_5"].equals(got["X_chg_5"])


def test_an_intraday_bar_sees_a_days_macro_release_only_from_the_days_last_bar(
    synthetic_onchain,
):
    """`published` is a day and a release comes out during it (H.10 at 4:15 pm ET): hourly
    bars of that day before its last hour use the day before's values; the daily bar of the
    day and the hourly bar closing at its end see it."""
    observed = [date(2020, 1, 6) + timedelta(days=i) for i in range(8)]
    macro = pl.DataFrame(
        {"series": "X", "date": observed, "value": [float(i) for i in range(8)]}
    ).with_columns(published=pl.col("date") + timedelta(days=1))
    start = datetime(2020, 1, 8)
    hourly = make_source("ohlcv", "synthetic", symbols=("BTC-USD",), timeframe="1h").fetch(
        start, start + timedelta(days=3)
    )
    got = compute_features(hourly, synthetic_onchain, macro)
    by_ts = dict(zip(got["ts"], got["X"], strict=True))
    # 9 January publishes 8 January's value (2.0): hours 0-22 of the 9th still see 1.0
    assert [by_ts[datetime(2020, 1, 9, h)] for h in (0, 12, 22)] == [1.0, 1.0, 1.0]
    assert by_ts[datetime(2020, 1, 9, 23)] == 2.0  # closes at the end of the 9th
    assert by_ts[datetime(2020, 1, 10, 5)] == 2.0
    age = dict(zip(got["ts"], got["X_age_days"], strict=True))
    assert age[datetime(2020, 1, 9, 12)] == 0 and age[datetime(2020, 1, 9, 23)] == 0
    daily = make_source("ohlcv", "synthetic", symbols=("BTC-USD",)).fetch(
        start, start + timedelta(days=3)
    )
    day = compute_features(daily, synthetic_onchain, macro)
    assert dict(zip(day["ts"], day["X"], strict=True))[datetime(2020, 1, 9)] == 2.0


def test_a_cut_inside_a_day_is_refused_naming_the_midnight_to_use(raw):
    with pytest.raises(ValueError, match=r"inside a day.*cut at midnight \(2019-06-12 00:00\)"):
        check_truncation_invariance(*raw, COMPUTE_FEATURES, COLS, cuts=[datetime(2019, 6, 12, 12)])
    with pytest.raises(ValueError, match="inside a day"):
        truncate_raw(*raw, datetime(2019, 6, 12, 0, 0, 1))


def test_default_cuts_fall_on_publication_weekdays_and_the_last_day(raw):
    ts = raw[0]["ts"]
    cuts = default_cuts(ts)
    assert cuts[-1] == ts.dt.truncate("1d").max()
    # Tuesday, Wednesday, Thursday: a macro value published that day exists at every cut
    assert [c.weekday() for c in cuts[:-1]] == [1, 2, 3]
    assert cuts[0] >= ts.dt.truncate("1d").unique().sort()[ts.dt.truncate("1d").n_unique() // 2]


def test_clean_labels_are_aligned(raw):
    cfg = LabelConfig()
    report = check_label_alignment(compute_labels(raw[0], cfg), label_columns(cfg), cfg.max_horizon)
    assert report.passed, report.summary()


def test_misaligned_labels_fail():
    cfg = LabelConfig(horizons=(1, 5), direction_horizon=5, vol_window=5)
    ts = [datetime(2020, 1, 1) + timedelta(days=i) for i in range(20)]
    ohlcv = pl.DataFrame(
        {"symbol": "X", "ts": ts, "close": [100.0 + i for i in range(20)]}
    ).with_columns(open=pl.col("close"), high=pl.col("close"), low=pl.col("close"), volume=1.0)
    good = compute_labels(ohlcv, cfg)
    assert check_label_alignment(good, label_columns(cfg), cfg.max_horizon).passed
    # a label filled in at the end (its window runs past the data), and a window ending at ts
    bad = good.with_columns(
        pl.col("fwd_ret_5").fill_null(0.0),
        label_end_ts=pl.when(pl.col("ts") == ts[3]).then(pl.col("ts")).otherwise("label_end_ts"),
    )
    report = check_label_alignment(bad, label_columns(cfg), cfg.max_horizon)
    assert not report.passed
    problems = report.offending
    assert set(problems.filter(pl.col("column") == "fwd_ret_5")["ts"]) == set(ts[-5:])
    assert problems.filter(pl.col("column") == "label_end_ts")["ts"].to_list() == [ts[3]]


def test_a_purged_split_passes_split_hygiene(dataset):
    rows, b = dataset
    report = check_split_hygiene(assign_fold(rows, b), b.val_start, b.test_start, b.embargo)
    assert report.passed, report.summary()


def test_an_unpurged_split_fails_split_hygiene(dataset):
    rows, b = dataset
    unpurged = rows.with_columns(
        split=pl.when(pl.col("ts") < b.val_start)
        .then(pl.lit("train"))
        .when(pl.col("ts") < b.test_start)
        .then(pl.lit("val"))
        .otherwise(pl.lit("test"))
    )
    report = check_split_hygiene(unpurged, b.val_start, b.test_start, b.embargo)
    assert not report.passed
    train_bad = report.offending.filter(pl.col("split") == "train")
    assert train_bad.height > 0
    assert (train_bad["label_end_ts"].drop_nulls() >= b.val_start - b.embargo).all()
    assert "split_hygiene" in report.summary()


def test_scaler_on_training_rows_passes_and_one_on_all_rows_fails(dataset):
    rows, b = dataset
    data = assign_fold(rows, b)
    is_train = data["split"] == TRAIN

    def on_train(d):
        return Standardizer.fit(d.filter(pl.col("split") == TRAIN), COLS)

    def on_all(d):
        return Standardizer.fit(d, COLS)

    assert check_fit_independence(on_train, data, is_train, COLS).passed
    assert check_scaler_matches_training_rows(on_train(data), data, COLS).passed
    leaky = check_fit_independence(on_all, data, is_train, COLS, name="scaler")
    assert not leaky.passed
    assert set(leaky.offending["split"]) == {"val", "test"}
    mismatch = check_scaler_matches_training_rows(on_all(data), data, COLS)
    assert not mismatch.passed
    assert "log_ret_1" in mismatch.offending["column"].to_list()


# --- Dagster: the checks run as blocking asset checks --------------------------------------------

GRAPH = [*INGEST_ASSETS, features, labels, training_dataset]
CHECKS = [*QUALITY_CHECKS, *LEAKAGE_CHECKS]
DOWNSTREAM = [features, labels, training_dataset]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("leakage") / "data"
    result = dg.materialize(
        [*GRAPH, *CHECKS],
        selection=INGEST_ASSETS,
        resources=default_resources(str(root)),
        tags={
            "dagster/asset_partition_range_start": "2017",
            "dagster/asset_partition_range_end": "2020",
        },
    )
    assert result.success
    return root


def _materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def test_clean_pipeline_passes_every_leakage_check(ingested, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(ingested, root)
    result = dg.materialize(
        [*GRAPH, *CHECKS], selection=DOWNSTREAM, resources=default_resources(str(root))
    )
    assert result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    leakage = {s.key.name for c in LEAKAGE_CHECKS for s in c.check_specs}
    assert leakage <= set(checks)
    assert all(checks[n].passed for n in leakage), {n: checks[n].description for n in leakage}
    assert checks["features_quality"].passed, checks["features_quality"].description
    assert _materialized(result) == {"features", "labels", "training_dataset"}


def test_a_leaky_feature_blocks_everything_downstream(ingested, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(ingested, root)
    monkeypatch.setattr(asset_features, "compute_features", _future_return)
    monkeypatch.setattr(ml_features, "compute_features", _future_return)
    result = dg.materialize(
        [*GRAPH, *CHECKS],
        selection=DOWNSTREAM,
        resources=default_resources(str(root)),
        raise_on_error=False,
    )
    assert not result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    failed = checks["features_truncation_invariance"]
    assert not failed.passed
    assert "log_ret_1" in failed.description
    assert checks["labels_alignment"].passed
    assert _materialized(result) == {"features", "labels"}  # training_dataset never ran


def _asset_future_return(o, c, m, *cfg):
    """A leak in the features asset's own code path only (ml.features stays clean): the next
    bar's return added to log_ret_5, nulls filled so that the quality check still passes."""
    f = COMPUTE_FEATURES(o, c, m, *cfg)
    nxt = (pl.col("log_close").shift(-1) - pl.col("log_close")).over("symbol").fill_null(0.0)
    return f.with_columns(log_ret_5=pl.col("log_ret_5") + nxt)


def test_stored_features_leak_in_the_asset_code_path_blocks_training(
    ingested, tmp_path, monkeypatch
):
    """The check compares the snapshot the features asset stored with features recomputed on
    truncated raw data: a leak planted where only the asset calls it is caught (issue 15,
    finding 1), not just one inside ml.features."""
    root = tmp_path / "data"
    shutil.copytree(ingested, root)
    monkeypatch.setattr(asset_features, "compute_features", _asset_future_return)
    result = dg.materialize(
        [*GRAPH, *CHECKS],
        selection=DOWNSTREAM,
        resources=default_resources(str(root)),
        raise_on_error=False,
    )
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["features_quality"].passed, checks["features_quality"].description
    failed = checks["features_truncation_invariance"]
    assert not failed.passed
    assert "log_ret_5" in failed.description
    assert not result.success
    assert "training_dataset" not in _materialized(result)
