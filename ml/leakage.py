"""Leakage checks: pure functions that prove (or refute) that nothing from the future, or from
validation and test rows, reaches features, labels, splits and fitted transforms.

Each returns a LeakageReport naming the rule and the offending rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any

import polars as pl

from ml.dataset import TEST, TRAIN, VAL, Standardizer


@dataclass
class LeakageReport:
    rule: str
    passed: bool
    checked: int  # rows (or comparisons) examined
    offending: pl.DataFrame = field(default_factory=pl.DataFrame)
    detail: str = ""

    def summary(self, max_rows: int = 5) -> str:
        if self.passed:
            return f"{self.rule}: passed on {self.checked} rows. {self.detail}".strip()
        rows = self.offending.head(max_rows).to_dicts()
        return (
            f"{self.rule}: FAILED, {self.offending.height} offending rows of {self.checked}. "
            f"{self.detail} e.g. {rows}"
        ).strip()


def _report(rule: str, checked: int, offending: pl.DataFrame, detail: str = "") -> LeakageReport:
    return LeakageReport(rule, offending.is_empty(), checked, offending, detail)


# --- (a) truncation invariance ------------------------------------------------------------------


def truncate_raw(
    ohlcv: pl.DataFrame, onchain: pl.DataFrame, macro: pl.DataFrame, cut: datetime
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """The raw data as it was known before `cut`: bars opened before it, on-chain days complete
    a day before it (day d's totals are used from bar d+1 on), macro values published before it.
    `cut` is a midnight: the on-chain and macro tables are by day."""
    if cut.time() != time(0):
        raise ValueError(
            f"Truncation cut {cut} is inside a day: the on-chain and macro tables are by day, so "
            "what was known before a time of day cannot be told; cut at midnight "
            f"({cut:%Y-%m-%d} 00:00)"
        )
    day = cut.date()
    return (
        ohlcv.filter(pl.col("ts") < cut),
        onchain.filter(pl.col("date") + pl.duration(days=1) < day),
        macro.filter(pl.col("published") < day),
    )


# Tuesday to Friday: FRED publishes on the business day after an observation, so a cut on one of
# these days has a value published that very day, which a leak of one day would read too early
# (a cut on a Sunday or Monday has none, and cannot see that leak)
_PUBLICATION_WEEKDAYS = (1, 2, 3, 4)


def default_cuts(ts: pl.Series, n: int = 3) -> list[datetime]:
    """`n` day boundaries spread over the later half of the data (after the warm-up), each moved
    to the next day that is a different weekday of Tuesday to Friday, then the last day of the
    data: every row but the newest day's is compared at some cut."""
    days = ts.dt.truncate("1d").unique().sort()
    if days.len() < 4:
        return []
    picks = [0.5 + 0.4 * i / max(n - 1, 1) for i in range(n)]
    cuts = set()
    for i, p in enumerate(picks):
        at = min(int(days.len() * p), days.len() - 1)
        weekday = _PUBLICATION_WEEKDAYS[i % len(_PUBLICATION_WEEKDAYS)]
        later = days.slice(at).filter(days.slice(at).dt.weekday() == weekday + 1)
        cuts.add(later[0] if later.len() else days[at])
    cuts.add(days[-1])
    return sorted(cuts)


def _mismatches(
    full: pl.DataFrame, cut: pl.DataFrame, columns: Sequence[str], tol: float, name: str = "full"
):
    # a column the truncated run lacks (say a macro series first published after the cut) is
    # null on every row there; the rows of `full` before the cut must then be null too
    absent = [c for c in columns if c not in cut.columns]
    cut = cut.select("symbol", "ts", *(c for c in columns if c in cut.columns)).with_columns(
        [pl.lit(None, pl.Float64).alias(c) for c in absent]
    )
    # the stored snapshot is read back from Parquet: align the key types with the recomputation
    cut = cut.with_columns(
        pl.col("symbol").cast(full.schema["symbol"]), pl.col("ts").cast(full.schema["ts"])
    )
    joined = full.select(["symbol", "ts", *columns]).join(
        cut, on=["symbol", "ts"], how="left", suffix="__cut"
    )

    def differs(c: str) -> pl.Expr:
        a, b = pl.col(c), pl.col(f"{c}__cut")
        return (
            (a.is_null() != b.is_null())
            | (a.is_nan() != b.is_nan()).fill_null(False)
            # an infinite value equals only itself
            | ((a.is_infinite() | b.is_infinite()) & (a != b)).fill_null(False)
            # finite values, relative to the recomputed one (the reference side may be what a
            # leak wrote); |inf - inf| and NaN - NaN are NaN, which polars orders above every
            # number, so they are left to the rules above
            | (a.is_finite() & b.is_finite() & ((a - b).abs() > tol * (1.0 + b.abs()))).fill_null(
                False
            )
        )

    # one pass over every column first; the offending rows only of the columns that differ
    flagged = joined.select([differs(c).any().alias(c) for c in columns]).row(0, named=True)
    parts = [
        joined.filter(differs(c)).select(
            "symbol",
            "ts",
            pl.lit(c).alias("column"),
            pl.col(c).cast(pl.Float64).alias(f"{name}_value"),
            pl.col(f"{c}__cut").cast(pl.Float64).alias("truncated_value"),
        )
        for c in columns
        if flagged[c]
    ]
    return pl.concat(parts) if parts else None


def _first_offenders(offending: pl.DataFrame, max_columns: int = 10) -> str:
    """'column at ts (symbol, cut day)' for the earliest offending row of each column."""
    firsts = (
        offending.sort(["ts", "cut", "symbol"])
        .group_by("column", maintain_order=True)
        .first()
        .sort(["ts", "column"])
    )
    named = [
        f"{r['column']} at {r['ts']} ({r['symbol']}, "
        + (f"cut {r['cut']:%Y-%m-%d})" if r["cut"] is not None else "all the data)")
        for r in firsts.head(max_columns).iter_rows(named=True)
    ]
    more = firsts.height - len(named)
    return "; ".join(named) + (f"; and {more} more columns" if more > 0 else "")


def check_truncation_invariance(
    ohlcv: pl.DataFrame,
    onchain: pl.DataFrame,
    macro: pl.DataFrame,
    compute: Callable[[pl.DataFrame, pl.DataFrame, pl.DataFrame], pl.DataFrame],
    columns: Sequence[str],
    cuts: Sequence[datetime] | None = None,
    tol: float = 1e-9,
    stored: pl.DataFrame | None = None,
) -> LeakageReport:
    """Features recomputed on the raw data cut at each date equal the reference features on
    every row before the cut. A feature that reads a later bar, an on-chain day not yet over or a
    macro value before its publication changes when the future is cut off, and is named here.

    The reference is `stored` when given: the features as a pipeline stored them (the snapshot
    downstream assets read), so that a leak in whatever code wrote them is caught, not only one
    in `compute`. Without it the reference is `compute` on the full raw data. With `stored`, every
    stored row is also compared with `compute` on all the raw data (rows after the last cut
    included): a difference there means the snapshot is not what the feature code makes of the
    raw tables (other code wrote it, or the raw tables changed since); a difference only at
    the cuts means the feature definitions read the future.
    """
    what = "stored features" if stored is not None else "features"
    reference = "stored" if stored is not None else "full"
    rule = f"truncation_invariance({what} at t depend only on data known at t)"
    cuts = list(cuts) if cuts is not None else default_cuts(ohlcv["ts"])
    full = stored if stored is not None else compute(ohlcv, onchain, macro)
    missing = [c for c in columns if c not in full.columns]
    if missing:
        bad = pl.DataFrame({"column": missing})
        return _report(rule, 0, bad, f"model columns missing from the {what}: {missing}")
    found, checked = [], 0
    whole = None
    if stored is not None:  # every stored row against the feature code on all the raw data
        checked += stored.height
        whole = _mismatches(stored, compute(ohlcv, onchain, macro), columns, tol, reference)
        if whole is not None:
            found.append(whole.with_columns(cut=pl.lit(None, pl.Datetime("us"))))
    for cut in cuts:
        part = compute(*truncate_raw(ohlcv, onchain, macro, cut))
        before = full.filter(pl.col("ts") < cut)
        checked += before.height
        bad = _mismatches(before, part, columns, tol, reference)
        if bad is not None:
            found.append(bad.with_columns(cut=pl.lit(cut).cast(pl.Datetime("us"))))
    offending = (
        pl.concat(found).sort(["cut", "ts", "symbol"], nulls_last=False)
        if found
        else pl.DataFrame()
    )
    detail = f"cuts {[f'{c:%Y-%m-%d}' for c in cuts]}, {len(columns)} columns"
    if stored is not None:
        detail += ", and every stored row against the features of all the raw data"
    if whole is not None:
        cols = whole["column"].unique(maintain_order=True).to_list()
        detail += (
            f"; columns that differ from the feature code's output on all the raw data: {cols};"
            f" first offending rows: {_first_offenders(offending.filter(pl.col('cut').is_null()))}"
            ". The stored snapshot is not what the current feature code computes from the"
            " current raw tables: code other than the features asset's wrote it (a leak in the"
            " asset's own code path), or the raw tables changed after it was written"
            " (materialize features again); do not train on this snapshot"
        )
    at_cuts = offending.filter(pl.col("cut").is_not_null()) if found else offending
    if at_cuts.height:
        cols = at_cuts["column"].unique(maintain_order=True).to_list()
        detail += (
            f"; columns that changed at the cuts: {cols}; first offending rows:"
            f" {_first_offenders(at_cuts)}."
            f" The {what} on these rows ({reference}_value) differ from the features"
            " recomputed on the raw data known before the cut (truncated_value): they depend on"
            " data after their time, a look-ahead leak"
        )
        if stored is not None:
            detail += (
                " in the code that wrote the snapshot or in the feature definitions (or the raw"
                " tables changed after the snapshot was written); do not train on this snapshot."
            )
        else:
            detail += " in the feature definitions."
    return _report(rule, checked, offending, detail)


# --- (b) label alignment ------------------------------------------------------------------------


def label_horizon(column: str) -> int | None:
    """The bars a label looks ahead, from its name: fwd_ret_5 -> 5, direction_90 -> 90."""
    m = re.search(r"_(\d+)$", column)
    return int(m.group(1)) if m else None


def check_label_alignment(
    labels: pl.DataFrame, label_cols: Sequence[str], max_horizon: int | None = None
) -> LeakageReport:
    """Every label window starts after the row's time (label_end_ts > ts where present, and a
    label present only where its window is inside the data), and the last h rows of a label
    with horizon h are null in each symbol."""
    rule = "label_alignment(label_end_ts > ts; last h rows of each h-bar label null)"
    d = labels.sort(["symbol", "ts"]).with_columns(
        _from_end=pl.int_range(pl.len(), 0, -1).over("symbol") - 1
    )
    parts = []
    if "label_end_ts" in d.columns:
        early = d.filter(pl.col("label_end_ts") <= pl.col("ts"))
        parts.append(
            early.select("symbol", "ts", pl.lit("label_end_ts").alias("column")).with_columns(
                problem=pl.lit("label window ends at or before the row time")
            )
        )
        if max_horizon is not None:
            beyond = d.filter(
                pl.col("label_end_ts").is_null() & (pl.col("_from_end") >= max_horizon)
            )
            parts.append(
                beyond.select("symbol", "ts", pl.lit("label_end_ts").alias("column")).with_columns(
                    problem=pl.lit("label_end_ts missing although the window is inside the data")
                )
            )
    for c in label_cols:
        h = label_horizon(c)
        if h is None:
            continue
        tail = d.filter((pl.col("_from_end") < h) & pl.col(c).is_not_null())
        parts.append(
            tail.select("symbol", "ts", pl.lit(c).alias("column")).with_columns(
                problem=pl.lit(
                    f"set within the last {h} bars, whose {h}-bar window runs past the data"
                )
            )
        )
    offending = pl.concat(parts) if parts else pl.DataFrame()
    return _report(rule, labels.height, offending, f"{len(label_cols)} label columns")


# --- (c) split hygiene --------------------------------------------------------------------------


def check_split_hygiene(
    data: pl.DataFrame, val_start: datetime, test_start: datetime, embargo: timedelta
) -> LeakageReport:
    """No training row's label window reaches val_start - embargo, no validation row's reaches
    test_start - embargo, and each row's split matches its time."""
    rule = (
        f"split_hygiene(train label_end_ts < {val_start - embargo:%Y-%m-%d}, "
        f"val label_end_ts < {test_start - embargo:%Y-%m-%d}, embargo {embargo.days}d)"
    )
    split, ts, end = pl.col("split"), pl.col("ts"), pl.col("label_end_ts")
    limit = (
        pl.when(split == TRAIN)
        .then(pl.lit(val_start - embargo))
        .otherwise(pl.lit(test_start - embargo))
    )
    overlap = (split.is_in([TRAIN, VAL])) & (end.is_null() | (end >= limit))
    wrong_segment = (
        ((split == TRAIN) & (ts >= val_start))
        | ((split == VAL) & ((ts < val_start) | (ts >= test_start)))
        | ((split == TEST) & (ts < test_start))
    )
    offending = data.filter(overlap | wrong_segment).select(
        "symbol",
        "ts",
        "split",
        "label_end_ts",
        pl.when(wrong_segment)
        .then(pl.lit("split does not match the row time"))
        .otherwise(pl.lit("label window reaches the next segment (minus embargo)"))
        .alias("problem"),
    )
    return _report(rule, data.height, offending.sort(["ts", "symbol"]))


# --- (d) fitted transforms see training rows only -----------------------------------------------


def perturb_rows(
    data: pl.DataFrame, mask: pl.Series, columns: Sequence[str], seed: int = 0
) -> pl.DataFrame:
    """`data` with `columns` of the rows where `mask` is true replaced by large random values."""
    import numpy as np

    rng = np.random.default_rng(seed)
    noise = {c: pl.Series(rng.normal(1e3, 1e2, data.height)) for c in columns}
    return data.with_columns(
        [pl.when(mask).then(noise[c]).otherwise(pl.col(c)).alias(c) for c in columns]
    )


def check_fit_independence(
    fit: Callable[[pl.DataFrame], Any],
    data: pl.DataFrame,
    is_train: pl.Series,
    columns: Sequence[str],
    same: Callable[[Any, Any], bool] = lambda a, b: a == b,
    name: str = "fit",
) -> LeakageReport:
    """Proves that `fit(data)` depends on the training rows only: perturbing every other row's
    `columns` must leave the fitted object unchanged."""
    rule = f"fit_independence({name} depends on training rows only)"
    before = fit(data)
    after = fit(perturb_rows(data, ~is_train, columns))
    others = int((~is_train).sum())
    if same(before, after):
        return _report(rule, data.height, pl.DataFrame(), f"{others} non-training rows perturbed")
    offending = data.filter(~is_train).select(
        ["symbol", "ts", *(["split"] if "split" in data.columns else [])]
    )
    return _report(
        rule,
        data.height,
        offending,
        f"the fitted {name} changed when the {others} non-training rows were perturbed: "
        f"{_diff(before, after)}",
    )


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, Standardizer) and isinstance(b, Standardizer):
        changed = [c for c, m1, m2 in zip(a.columns, a.mean, b.mean, strict=True) if m1 != m2]
        return f"mean changed for columns {changed[:10]}"
    return f"{str(a)[:200]} != {str(b)[:200]}"


def standardizer_close(a: Standardizer, b: Standardizer, tol: float = 1e-9) -> bool:
    return (
        a.columns == b.columns
        and all(abs(x - y) <= tol * (1 + abs(x)) for x, y in zip(a.mean, b.mean, strict=True))
        and all(abs(x - y) <= tol * (1 + abs(x)) for x, y in zip(a.std, b.std, strict=True))
    )


def check_scaler_matches_training_rows(
    used: Standardizer, data: pl.DataFrame, columns: Sequence[str]
) -> LeakageReport:
    """The scaler a training path uses equals one refitted on the rows of split == train."""
    rule = "scaler_fit_on_train_only(scaler used == Standardizer.fit(train rows))"
    train = data.filter(pl.col("split") == TRAIN)
    ref = Standardizer.fit(train, list(columns))
    if standardizer_close(used, ref):
        return _report(rule, train.height, pl.DataFrame(), f"{len(columns)} columns")
    bad = [
        {"column": c, "used_mean": m1, "train_mean": m2, "used_std": s1, "train_std": s2}
        for c, m1, m2, s1, s2 in zip(
            ref.columns, used.mean, ref.mean, used.std, ref.std, strict=False
        )
        if abs(m1 - m2) > 1e-9 * (1 + abs(m2)) or abs(s1 - s2) > 1e-9 * (1 + abs(s2))
    ]
    return _report(
        rule,
        train.height,
        pl.DataFrame(bad) if bad else pl.DataFrame({"column": ["<columns differ>"]}),
        "the scaler differs from one fitted on the training rows",
    )


def lanes_scaler(
    features: pl.DataFrame,
    labels: pl.DataFrame,
    splits: pl.DataFrame,
    feature_columns: Sequence[str],
    horizons: Sequence[int],
    direction_horizon: int,
    vol_window: int,
) -> Standardizer:
    """The scaler the Mamba2 training path fits (ml.sequence_data.build_lanes, as train_mamba
    calls it). Imports torch, so only when called."""
    from ml.sequence_data import build_lanes

    return build_lanes(
        features,
        labels,
        splits,
        list(feature_columns),
        tuple(horizons),
        f"direction_{direction_horizon}",
        quantile_col=f"fwd_ret_{direction_horizon}",
        sigma_col=f"fwd_vol_{vol_window}",
    ).scaler
