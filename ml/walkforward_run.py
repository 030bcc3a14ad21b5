"""Running the forecasters of one walk-forward fold, and putting their predictions together.

Predictions are kept in one long table: a row per (forecaster, seed, symbol, ts) of the fold's
validation and test rows, with the prediction columns of `ml.forecasters.base` (null where a
forecaster does not cover a target). `seed` is null for deterministic forecasters and for the
mean over seeds of a neural model, which is what the evaluation compares (each seed is also
scored alone for the mean +- std).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import polars as pl

from ml.forecasters import ALL_TARGETS, REGISTRY, FoldData, TargetSpec
from ml.forecasters.ensemble import (
    NoValidationRowsError,
    combine,
    equal_weights,
    fit_ensemble,
)

KEYS = ["symbol", "ts"]
# part of every predictions artifact's version: bump when seed means or ensembles change
ASSEMBLY_CODE_VERSION = "3"


def prediction_columns(targets: TargetSpec) -> list[str]:
    return [c for t in ALL_TARGETS for c in targets.prediction_columns(t)]


def to_long(
    pred: pl.DataFrame,
    forecaster: str,
    seed: int | None,
    fold: str,
    scored: pl.DataFrame,
    targets: TargetSpec,
) -> pl.DataFrame:
    """One forecaster's wide predictions of a fold's `scored` rows (symbol, ts, split) in the
    long layout."""
    cols = prediction_columns(targets)
    if pred.height != scored.height:
        raise ValueError(
            f"{forecaster} predicted {pred.height} rows of fold {fold}; "
            f"it must predict the {scored.height} scored rows"
        )
    return (
        scored.select([*KEYS, "split"])
        .join(pred, on=KEYS, how="left", maintain_order="left")
        .select(
            pl.lit(fold).alias("fold"),
            pl.lit(forecaster).alias("forecaster"),
            pl.lit(seed, dtype=pl.Int64).alias("seed"),
            *KEYS,
            "split",
            *[
                (pl.col(c) if c in pred.columns else pl.lit(None)).cast(pl.Float64).alias(c)
                for c in cols
            ],
        )
    )


def fit_registered(
    data: FoldData,
    names: Sequence[str] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[pl.DataFrame, dict[str, dict]]:
    """Fit every registered (non-sequence) forecaster on the fold and predict its scored rows.

    Returns the long predictions and, per forecaster, its fit seconds (and what it exposes in
    `fit_info()`, if anything)."""
    names = list(names or REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"Unknown forecasters {unknown}; registered: {sorted(REGISTRY)}")
    parts, info = [], {}
    for i, name in enumerate(names, 1):
        started = time.perf_counter()
        f = REGISTRY[name]().fit(data)
        parts.append(to_long(f.predict(data), name, None, data.key, data.scored, data.targets))
        seconds = time.perf_counter() - started
        info[name] = {"seconds": round(seconds, 2), **getattr(f, "fit_info", lambda: {})()}
        log(f"fold {data.key}: [{i}/{len(names)}] {name} fitted and predicted in {seconds:.1f} s")
    return pl.concat(parts), info


def seed_means(long: pl.DataFrame) -> pl.DataFrame:
    """For every forecaster with seeds, the mean prediction over its seeds (seed null)."""
    seeded = long.filter(pl.col("seed").is_not_null())
    if seeded.is_empty():
        return long.clear()
    value_cols = [
        c for c in long.columns if c not in ("fold", "forecaster", "seed", *KEYS, "split")
    ]
    # sigma is averaged as a variance (the mixture's variance), everything else as is
    return (
        seeded.group_by(["fold", "forecaster", *KEYS, "split"], maintain_order=True)
        .agg(
            [
                (pl.col(c) ** 2).mean().sqrt() if c == "sigma" else pl.col(c).mean()
                for c in value_cols
            ]
        )
        .with_columns(pl.lit(None, dtype=pl.Int64).alias("seed"))
        .select(long.columns)
    )


# the RF + XGB + LSTM weighted ensemble of the common Bitcoin tutorials, and its simple average
RF_XGB_LSTM, RF_XGB_LSTM_EQUAL = "rf_xgb_lstm", "rf_xgb_lstm_equal"
RF_XGB_LSTM_MEMBERS = ("random_forest", "xgboost", "lstm")
ENSEMBLES = ("ensemble", "ensemble_equal", RF_XGB_LSTM, RF_XGB_LSTM_EQUAL)


def _members(long: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Per single-prediction forecaster (seed means included, ensembles not): its wide rows
    (symbol, ts, split and the prediction columns it covers)."""
    members = long.filter(pl.col("seed").is_null() & ~pl.col("forecaster").is_in(ENSEMBLES))
    wide = {}
    for (name,), frame in members.group_by("forecaster", maintain_order=True):
        frame = frame.drop(["fold", "forecaster", "seed"])
        wide[name] = frame.select([c for c in frame.columns if not frame[c].is_null().all()])
    return wide


def with_ensembles(
    long: pl.DataFrame,
    past: pl.DataFrame | None,
    labels: pl.DataFrame,
    targets: TargetSpec,
) -> tuple[pl.DataFrame, dict]:
    """Add `ensemble` and `ensemble_equal` (the simple average) over every single-prediction
    forecaster of one fold.

    The ensemble's weights are fitted on `past`: the out-of-sample test predictions of the
    earlier folds (long layout) whose label windows end before this fold's validation end, so
    every member's prediction there is one its model never fitted, early-stopped or
    calibrated on. (This fold's own validation rows would not do: LightGBM and the neural
    models early-stop on them, which makes them look better there than out of sample, and the
    weights would favour them.) The first fold has no past: its ensemble is the simple average.

    `long` must already hold the seed means; `labels` gives the label columns per (symbol, ts)."""
    wide = _members(long)
    names = list(wide)
    fold = long["fold"][0]
    scored = {n: f.drop("split") for n, f in wide.items()}
    equal = equal_weights(scored, targets)
    fitted, fitted_on = equal, 0
    if past is not None and not past.is_empty():
        history = {n: f.drop("split") for n, f in _members(past).items() if n in wide}
        past_labels = labels.join(past.select(KEYS).unique(), on=KEYS, how="inner")
        if set(history) == set(names) and past_labels.height:
            fitted, fitted_on = fit_ensemble(history, past_labels, targets), past_labels.height
    split = wide[names[0]].select([*KEYS, "split"])
    out = [long]
    for name, weights in (("ensemble", fitted), ("ensemble_equal", equal)):
        frame = split.join(combine(scored, weights), on=KEYS, how="left", maintain_order="left")
        out.append(to_long(frame.drop("split"), name, None, fold, split, targets))
    return pl.concat(out, how="vertical_relaxed"), {
        "ensemble": fitted.to_json(),
        "ensemble_fitted_on_rows": fitted_on,
        "ensemble_equal": equal.to_json(),
    }


def with_rf_xgb_lstm(
    long: pl.DataFrame, labels: pl.DataFrame, targets: TargetSpec
) -> tuple[pl.DataFrame, dict]:
    """Add `rf_xgb_lstm`, the tutorials' RandomForest + XGBoost + LSTM ensemble (the LSTM as its
    seed mean), with its weights fitted on this fold's VALIDATION rows only, as the tutorials
    fit theirs, and `rf_xgb_lstm_equal`, the simple average of the three.

    No test row takes part in the weights, so the test rows stay out of sample. The validation
    rows are not clean for every member, which is why the main `ensemble` is fitted on earlier
    folds instead (`with_ensembles`): XGBoost and the LSTM early-stop on them and look better
    there than out of sample, so the fitted weights lean towards them; the RandomForest does not
    use validation rows. A fold without all three members gets neither (the reason is returned
    as `rf_xgb_lstm_skipped`); one without a validation row holding every label and prediction
    of some target gets the simple average as `rf_xgb_lstm` too (`rf_xgb_lstm_fallback` says
    why).

    `long` must already hold the seed means; `labels` gives the label columns per (symbol, ts)."""
    wide = _members(long)
    missing = [m for m in RF_XGB_LSTM_MEMBERS if m not in wide]
    if missing:
        return long, {
            RF_XGB_LSTM: None,
            f"{RF_XGB_LSTM}_skipped": f"no {missing} predictions in this fold",
        }
    members = {m: wide[m].drop("split") for m in RF_XGB_LSTM_MEMBERS}
    split = wide[RF_XGB_LSTM_MEMBERS[0]].select([*KEYS, "split"])
    val_labels = labels.join(split.filter(pl.col("split") == "val").select(KEYS), on=KEYS)
    equal = equal_weights(members, targets)
    fallback = None
    try:
        fitted = fit_ensemble(members, val_labels, targets)
    except NoValidationRowsError as err:  # nothing to fit on: the simple average, and why
        fitted, fallback = equal, str(err)
    fold = long["fold"][0]
    out = [long]
    for name, weights in ((RF_XGB_LSTM, fitted), (RF_XGB_LSTM_EQUAL, equal)):
        frame = split.join(combine(members, weights), on=KEYS, how="left", maintain_order="left")
        out.append(to_long(frame.drop("split"), name, None, fold, split, targets))
    return pl.concat(out, how="vertical_relaxed"), {
        RF_XGB_LSTM: fitted.to_json(),
        f"{RF_XGB_LSTM}_fitted_on_rows": 0 if fallback else val_labels.height,
        f"{RF_XGB_LSTM}_fallback": fallback,
        RF_XGB_LSTM_EQUAL: equal.to_json(),
    }


def backtest_frame(
    long: pl.DataFrame, prices: pl.DataFrame, forecasters: Sequence[str]
) -> pl.DataFrame:
    """The backtest engine's input: every bar of each symbol from its first to its last
    predicted row, with open, close, the trailing `log_ret_*` columns `prices` has (momentum)
    and `<forecaster>_p_down`, `_p_up`, `_sigma` for each forecaster (seed means). A bar without
    a forecaster's prediction (a gap between folds that were not materialized) has nulls there,
    which the engine trades as flat, so a gap is never bridged by one interval."""
    single = long.filter(pl.col("seed").is_null())
    span = single.group_by("symbol").agg(first=pl.col("ts").min(), last=pl.col("ts").max())
    trailing = [c for c in prices.columns if c.startswith("log_ret_")]
    frame = (
        prices.select([*KEYS, "open", "close", *trailing])
        .join(span, on="symbol", how="inner")
        .filter(pl.col("ts").is_between(pl.col("first"), pl.col("last")))
        .drop(["first", "last"])
    )
    for name in forecasters:
        part = single.filter(pl.col("forecaster") == name).select(
            *KEYS,
            pl.col("p_down").alias(f"{name}_p_down"),
            pl.col("p_up").alias(f"{name}_p_up"),
            pl.col("sigma").alias(f"{name}_sigma"),
        )
        frame = frame.join(part, on=KEYS, how="left")
    return frame.sort(KEYS)
