"""latest_forecast: a trained sequence model loaded from its artifact, its recurrent state
carried forward over new bars only, and the same numbers as recomputing the whole history."""

import dataclasses
from datetime import timedelta

import numpy as np
import polars as pl
import pytest

from ml.forecasters.neural import SequenceForecaster, SequenceSettings
from ml.live import carry_forward, live_fold_data, load_state, save_state
from ml.walkforward import fold_for_key
from pipelines.train_sequences import _train
from warehouse import DataPaths, Warehouse

FAST = SequenceSettings(epochs=1, tbptt_len=256, patience=1, min_steps=0)
SEEDS = (0, 1)
NEW = 5  # bars that "arrive" after the first run
COLUMNS = ["p_down", "p_flat", "p_up", "q10", "q90", "sigma", "ret_1", "ret_5", "ret_10", "ret_30"]


@pytest.fixture(scope="module")
def artifact(synthetic_fold, tmp_path_factory):
    """A Mamba2 artifact folder of two seeds, written by the training process's own writer."""
    folder = tmp_path_factory.mktemp("mamba2")
    out: dict = {}
    _train(folder, "mamba2", synthetic_fold, SEEDS, FAST, log=lambda _: None, out=out)
    return folder


@pytest.fixture(scope="module")
def live(artifact, synthetic_dataset, synthetic_fold):
    """The loaded seeds and a function giving today's lanes for the rows up to `until`."""
    seeds = [SequenceForecaster.from_artifact(artifact, s, device="cpu") for s in SEEDS]
    rows = synthetic_dataset["rows"]
    fold = fold_for_key("2021", _wf(), rows["ts"].min())

    def lanes(frame: pl.DataFrame):
        data = live_fold_data(frame, fold, seeds[0].input_columns, synthetic_fold.targets)
        return seeds[0].lanes(data).groups

    return seeds, rows, lanes, synthetic_fold.targets


def _wf():
    from ml.walkforward import WalkForwardConfig

    return WalkForwardConfig()


def _frame(result) -> pl.DataFrame:
    return result.forecasts.sort(["symbol", "as_of"])


def test_latest_forecast_model_loaded_from_its_artifact_predicts_what_training_predicted(
    artifact, synthetic_fold
):
    stored = pl.read_parquet(artifact / "predictions.parquet").filter(pl.col("seed") == 1)
    loaded = SequenceForecaster.from_artifact(artifact, 1, device="cpu")
    pred = loaded.predict(synthetic_fold)
    wide = stored.select("symbol", "ts", *COLUMNS).sort(["symbol", "ts"])
    again = pred.select("symbol", "ts", *COLUMNS).sort(["symbol", "ts"])
    assert wide.height == again.height > 500
    for c in COLUMNS:
        np.testing.assert_allclose(again[c].to_numpy(), wide[c].to_numpy(), atol=1e-5, err_msg=c)


def _reference(seeds, groups, targets) -> pl.DataFrame:
    """The forecast at every bar of every lane recomputed from the start of the history the
    way `predict` runs it (whole lanes in training-sized chunks), averaged over the seeds here
    (probabilities and returns as means, sigma as the root mean variance)."""
    frames = []
    for g in groups:
        outs = [f.stream(g.x)[0] for f in seeds]
        mean = {
            k: np.sqrt(np.mean([o[k] ** 2 for o in outs], 0))
            if k == "sigma"
            else np.mean([o[k] for o in outs], 0)
            for k in outs[0]
        }
        for b, symbol in enumerate(g.symbols):
            own = np.flatnonzero(g.segment[b].numpy() != -1)
            cols = seeds[0].columns(mean, b, own, targets)
            frames.append(pl.DataFrame({"symbol": symbol, "as_of": g.calendar.gather(own), **cols}))
    return pl.concat(frames).with_columns(pl.col(pl.Float32).cast(pl.Float64))


def _same_as_reference(got: pl.DataFrame, reference: pl.DataFrame) -> None:
    want = got.select("symbol", "as_of").join(reference, on=["symbol", "as_of"], how="left")
    assert want.height == got.height and want["p_up"].null_count() == 0
    for c in COLUMNS:
        np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), atol=2e-5, err_msg=c)


def test_latest_forecast_carried_over_new_bars_equals_recomputing_the_history(live):
    seeds, rows, lanes, targets = live
    newest = rows["ts"].max()
    cut = newest - timedelta(days=NEW)
    first = carry_forward(seeds, lanes(rows.filter(pl.col("ts") <= cut)), targets, None)
    assert first.restarted  # nothing saved yet: the whole history ran
    full_groups = lanes(rows)
    carried = carry_forward(seeds, full_groups, targets, first.state)
    assert not carried.restarted
    # only the new bars ran: NEW more days on the crypto calendar, the new weekdays (or the
    # newest bar again) on the business-day one
    assert carried.bars_run <= 2 * NEW < sum(g.calendar.len() for g in full_groups) / 100
    a = _frame(carried)
    assert a["as_of"].min() > cut and a["as_of"].max() == newest
    assert a.filter(pl.col("symbol") == "BTC-USD").height == NEW
    _same_as_reference(a, _reference(seeds, full_groups, targets))
    # each symbol's forecast is a distribution: probabilities sum to one, the band is ordered
    probs = a.select(pl.sum_horizontal("p_down", "p_flat", "p_up")).to_series().to_numpy()
    np.testing.assert_allclose(probs, 1.0, atol=1e-5)
    assert (a["q10"] < a["q90"]).all() and (a["sigma"] > 0).all()


def test_latest_forecast_from_the_start_returns_the_out_of_sample_bars_only(live):
    seeds, rows, lanes, targets = live
    groups = lanes(rows)
    since = rows["ts"].max() - timedelta(days=60)
    fresh = carry_forward(seeds, groups, targets, None, fresh_from=since)
    a = _frame(fresh)
    assert a["as_of"].min() > since and a.filter(pl.col("symbol") == "BTC-USD").height == 60
    _same_as_reference(a, _reference(seeds, groups, targets))
    assert fresh.bars_run == sum(g.calendar.len() for g in groups)


def test_latest_forecast_rerun_for_the_same_bar_recomputes_only_it_with_the_same_numbers(
    live, tmp_path
):
    seeds, rows, lanes, targets = live
    groups = lanes(rows)
    first = carry_forward(seeds, groups, targets, None)
    path = tmp_path / "state.pt"
    save_state(path, first.state)
    again = carry_forward(seeds, groups, targets, load_state(path))
    assert again.bars_run == len(groups)  # the newest bar of each calendar group, once more
    newest = _frame(first).filter(pl.col("as_of") == pl.col("as_of").max().over("symbol"))
    assert _frame(again).select("symbol", "as_of").equals(newest.select("symbol", "as_of"))
    _same_as_reference(_frame(again), _reference(seeds, groups, targets))
    # checkpoints: every one of the newest 8 bars, every 8th before, back to 40 bars
    (btc,) = [v for k, v in first.state["groups"].items() if k == "BTC-USD"]
    T = groups[[g.symbols for g in groups].index(["BTC-USD"])].calendar.len()
    back = sorted(T - 1 - c["pos"] for c in btc)
    assert back[:8] == list(range(8)) and max(back) < 40 and len(btc) <= 13


def test_latest_forecast_replays_from_before_a_revised_bar_and_keeps_old_forecasts(live):
    seeds, rows, lanes, targets = live
    newest = rows["ts"].max()
    cut = newest - timedelta(days=NEW)
    first = carry_forward(seeds, lanes(rows.filter(pl.col("ts") <= cut)), targets, None)
    # the refresh re-read its overlap and a source revised BTC's bar five days before the cut
    revised_day = cut - timedelta(days=5)
    col = seeds[0].input_columns[0]
    revised = rows.with_columns(
        pl.when((pl.col("symbol") == "BTC-USD") & (pl.col("ts") == revised_day))
        .then(pl.col(col) + 1.0)
        .otherwise(pl.col(col))
        .alias(col)
    )
    groups = lanes(revised)
    carried = carry_forward(seeds, groups, targets, first.state)
    assert not carried.restarted
    a = _frame(carried).filter(pl.col("symbol") == "BTC-USD")
    # replayed from a checkpoint before the revised bar (every 8th is kept that far back) ...
    assert carried.bars_run >= NEW + 5 + 1 + 1  # BTC's group; the stocks' group carried
    # ... but only the new bars are returned: forecasts already issued stay as they were
    assert a["as_of"].min() > cut and a.height == NEW
    _same_as_reference(a, _reference(seeds, groups, targets))
    # the returned bars are out of sample for the model: none at or before fresh_from
    late = carry_forward(seeds, groups, targets, first.state, fresh_from=cut + timedelta(days=2))
    assert _frame(late)["as_of"].min() > cut + timedelta(days=2)


def test_latest_forecast_restarts_a_group_whose_symbols_changed(live):
    seeds, rows, lanes, targets = live
    # the synthetic market: BTC-USD (every day) and two business-day stocks, ACME and GLBX
    fewer = rows.filter(pl.col("symbol") != "GLBX")  # a symbol added later
    first = carry_forward(seeds, lanes(fewer), targets, None)
    groups = lanes(rows)
    carried = carry_forward(seeds, groups, targets, first.state)
    assert carried.restarted == ["ACME|GLBX: no saved state"]  # BTC-USD's state carried on
    _same_as_reference(_frame(carried), _reference(seeds, groups, targets))


def test_latest_forecast_ignores_a_state_from_other_settings_or_an_unreadable_file(live, tmp_path):
    seeds, rows, lanes, targets = live
    groups = lanes(rows)
    first = carry_forward(seeds, groups, targets, None)
    other = {**first.state, "header": {**first.state["header"], "precision": "bf16"}}
    again = carry_forward(seeds, groups, targets, other)
    assert len(again.restarted) == len(groups) and "other code, device" in again.restarted[0]
    broken = tmp_path / "state.pt"
    broken.write_bytes(b"not a torch file")
    assert load_state(broken) is None
    # a checkpoint naming a state class that no longer exists: that group restarts
    gone = {
        **first.state,
        "groups": {
            k: [
                {**c, "states": [{**st, "spec": ("dc", "ml.gone:State", {})} for st in c["states"]]}
                for c in v
            ]
            if k == "BTC-USD"
            else v
            for k, v in first.state["groups"].items()
        },
    }
    again = carry_forward(seeds, groups, targets, gone)
    assert again.restarted == ["BTC-USD: saved state unreadable"]


def test_latest_forecast_of_a_windowed_model_is_recomputed_every_time(live, artifact):
    seeds, rows, lanes, targets = live
    windowed = []
    for f in seeds:
        g = SequenceForecaster.from_artifact(artifact, f.seed, device="cpu")
        g.settings = dataclasses.replace(g.settings, stateful=False)
        windowed.append(g)
    groups = lanes(rows)
    first = carry_forward(
        windowed, groups, targets, None, fresh_from=rows["ts"].max() - timedelta(days=3)
    )
    assert first.state["groups"] == {} and all("windowed" in r for r in first.restarted)
    # the state restarts every window, as predict runs it: not a per-bar or carried state
    _same_as_reference(_frame(first), _reference(windowed, groups, targets))


def test_latest_forecast_rows_upsert_by_symbol_asof_and_model_version(tmp_path):
    from datetime import datetime

    from warehouse.schema import FORECASTS

    wh = Warehouse(DataPaths.at(tmp_path))

    def rows(version: str, p_up: float) -> pl.DataFrame:
        base = {c: [0.1, 0.2] for c, t in FORECASTS.columns.items() if t == pl.Float64()}
        return pl.DataFrame(
            {
                **base,
                "symbol": ["BTC-USD", "ETH-USD"],
                "as_of": [datetime(2024, 1, 2)] * 2,
                "model_version": [version] * 2,
                "model": ["mamba2"] * 2,
                "fold": ["2024"] * 2,
                "p_up": [p_up] * 2,
                "direction_horizon": [90, 90],
                "sigma_window": [30, 30],
                "created_at": [datetime(2024, 1, 3)] * 2,
            }
        ).select(list(FORECASTS.columns))

    assert wh.upsert("forecasts", rows("v1", 0.3)).rows_after == 2
    result = wh.upsert("forecasts", rows("v1", 0.4))  # the same bar again: replaced
    assert (result.rows_deleted, result.rows_after) == (2, 2)
    assert wh.read("forecasts")["p_up"].to_list() == [0.4, 0.4]
    assert wh.upsert("forecasts", rows("v2", 0.5)).rows_after == 4  # another model version
    # a quote and SQL in a value are data, not SQL
    evil = rows("v3'); DROP TABLE forecasts; --", 0.6)
    assert wh.upsert("forecasts", evil).rows_after == 6
