"""Data-quality suites for the raw tables, run with Great Expectations 1.x.

Each table has one suite; it is validated per entity (symbol, asset or series) so that
"timestamps unique and increasing" means per symbol, as it should. Great Expectations is
imported lazily: it takes seconds to import and only the checks need it.

Each outcome is an error (a defect of the table: it fails the report) or a warning (worth a
look, not a defect: a macro series or on-chain data ending before the window end is a ragged
edge that the features' ragged-edge rule handles, see ml.features.select_model_columns).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Literal

import polars as pl

from warehouse.schema import TableSpec, table_spec


@dataclass
class ExpectationOutcome:
    expectation: str
    kwargs: dict[str, Any]
    success: bool
    unexpected_count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)  # offending rows, with entity
    severity: Literal["error", "warning"] = "error"  # a failed warning does not fail the report

    @property
    def rule(self) -> str:
        shown = {k: v for k, v in self.kwargs.items() if k not in ("batch_id", "result_format")}
        return f"{self.expectation}({', '.join(f'{k}={v}' for k, v in shown.items())})"


@dataclass
class QualityReport:
    table: str
    rows: int
    entities: list[str]
    outcomes: list[ExpectationOutcome]

    @property
    def success(self) -> bool:
        """No error failed (warnings may have)."""
        return not self.failures

    @property
    def failures(self) -> list[ExpectationOutcome]:
        """The failed errors: what makes the report fail."""
        return [o for o in self.outcomes if not o.success and o.severity == "error"]

    @property
    def warnings(self) -> list[ExpectationOutcome]:
        """The failed warnings: reported, but the report still passes."""
        return [o for o in self.outcomes if not o.success and o.severity == "warning"]

    def summary(self) -> str:
        if self.success:
            head = f"{self.table}: {len(self.outcomes)} expectations passed on {self.rows} rows"
            if self.warnings:
                head = (
                    f"{self.table}: {len(self.outcomes) - len(self.warnings)} of "
                    f"{len(self.outcomes)} expectations passed on {self.rows} rows, "
                    f"{len(self.warnings)} warned"
                )
        else:
            head = (
                f"{self.table}: {len(self.failures)} of {len(self.outcomes)} expectations failed "
                f"on {self.rows} rows"
            )
        lines = [head]
        for f in self.failures:
            lines.append(f"- {f.rule}: {f.unexpected_count} rows, e.g. {f.examples[:3]}")
        for w in self.warnings:
            lines.append(f"- warning {w.rule}: {w.unexpected_count} rows, e.g. {w.examples[:3]}")
        return "\n".join(lines)


def _expectations(spec: TableSpec) -> list:
    import great_expectations.expectations as gxe

    cols = list(spec.columns)
    float_cols = [c for c, t in spec.columns.items() if t == pl.Float64()]
    exps = [gxe.ExpectTableColumnsToMatchOrderedList(column_list=cols)]
    exps += [gxe.ExpectColumnValuesToBeOfType(column=c, type_="float64") for c in float_cols]
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in spec.key]
    exps += [
        gxe.ExpectCompoundColumnsToBeUnique(column_list=list(spec.key)),
        gxe.ExpectColumnValuesToBeIncreasing(column=spec.time_column, strictly=True),
    ]
    if spec.name == "ohlcv":
        prices = ["open", "high", "low", "close"]
        exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in [*prices, "volume"]]
        exps += [
            gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, strict_min=True)
            for c in prices
        ]
        exps += [gxe.ExpectColumnValuesToBeBetween(column="volume", min_value=0)]
        exps += [
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A=a, column_B=b, or_equal=True)
            for a, b in [
                ("high", "open"),
                ("high", "close"),
                ("open", "low"),
                ("close", "low"),
                ("high", "low"),
            ]
        ]
    elif spec.name == "onchain":
        exps += [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0) for c in float_cols]
        exps += [
            gxe.ExpectColumnValuesToBeBetween(column="difficulty", min_value=0, strict_min=True)
        ]
    elif spec.name == "macro":
        exps += [
            gxe.ExpectColumnValuesToNotBeNull(column="published"),
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="published", column_B="date", or_equal=True
            ),
        ]
    return exps


_SUITES: dict[tuple, tuple] = {}


def _suite(name: str, exps: list) -> tuple:
    """(batch definition, suite) for a list of expectations, built once per distinct list."""
    key = (name, tuple(repr(e) for e in exps))
    if key not in _SUITES:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        asset = ctx.data_sources.add_pandas(f"mambacast_{name}").add_dataframe_asset(name)
        suite = gx.ExpectationSuite(name=f"{name}_quality")
        for exp in exps:
            suite.add_expectation(exp)
        _SUITES[key] = (asset.add_batch_definition_whole_dataframe("whole"), ctx.suites.add(suite))
    return _SUITES[key]


@functools.cache
def _batch_definition(table: str):
    return _suite(table, _expectations(table_spec(table)))


def _run_suite(
    batch_def,
    suite,
    part: pl.DataFrame,
    merged: dict[str, ExpectationOutcome],
    label: dict[str, Any],
    max_examples: int,
    keep: list[str] | None = None,
) -> None:
    """Validate one frame and merge its outcomes into `merged` (keyed by expectation)."""
    result = batch_def.get_batch(batch_parameters={"dataframe": part.to_pandas()}).validate(
        suite, result_format={"result_format": "COMPLETE"}
    )
    for r in result.results:
        cfg = r.expectation_config
        key = f"{cfg.type}:{sorted(cfg.kwargs.items(), key=str)}"
        out = merged.setdefault(key, ExpectationOutcome(cfg.type, dict(cfg.kwargs), True))
        if r.success:
            continue
        out.success = False
        res = r.result or {}
        idx = res.get("unexpected_index_list") or []
        out.unexpected_count += int(res.get("unexpected_count") or len(idx) or 1)
        rows = part.with_row_index("_row")[[i for i in idx[:max_examples] if isinstance(i, int)]]
        if keep is not None:  # the key columns and the columns the expectation is about
            named = [v for k, v in cfg.kwargs.items() if k.startswith("column")]
            named = [c for v in named for c in (v if isinstance(v, list) else [v])]
            cols = list(dict.fromkeys([*keep, *named, "_row"]))
            rows = rows.select([c for c in cols if c in rows.columns])
        if rows.height:
            out.examples += rows.drop("_row").to_dicts()[: max_examples - len(out.examples)]
        elif "observed_value" in res:
            out.examples.append({**label, "observed": res["observed_value"]})


def validate_table(table: str, df: pl.DataFrame, max_examples: int = 5) -> QualityReport:
    """Validate `df` (rows of raw table `table`, any window) against the table's suite."""
    spec = table_spec(table)
    batch_def, suite = _batch_definition(table)
    merged: dict[str, ExpectationOutcome] = {}
    entities = df[spec.entity_column].unique(maintain_order=True).to_list() if df.height else []
    for entity in entities or [None]:
        part = df if entity is None else df.filter(pl.col(spec.entity_column) == entity)
        _run_suite(batch_def, suite, part, merged, {spec.entity_column: entity}, max_examples)
    return QualityReport(table, df.height, [str(e) for e in entities], list(merged.values()))


# ---------------------------------------------------------------------------------------------
# Rules Great Expectations has no expectation for (gaps, staleness, freshness, one-bar moves),
# written in polars and reported as ExpectationOutcome like the suites above.

DAILY_TABLES = ("ohlcv", "onchain", "macro")
# tables whose lagging or early-ending entities are ragged edges, handled by the features'
# ragged-edge rule: staleness and freshness there are warnings, not failures of the table
RAGGED_TABLES = ("onchain", "macro")


@dataclass(frozen=True)
class RuleConfig:
    max_missing_calendar_days: int = 0  # entities trading every day (crypto, on-chain)
    # business days missing between two rows, beyond US federal holidays (which are never
    # counted): stocks close on a few other days (Good Friday, national days of mourning)
    max_missing_business_days: int = 2
    # macro series: the Fed and the Treasury market close for storms and shutdowns too
    # (DTWEXBGS misses 4 business days in February 2010 and 3 in January 2016); a longer hole
    # is a broken download, not a closure
    macro_max_missing_business_days: int = 5
    macro_max_stale_business_days: int = 10  # no new macro value for longer than this
    fresh_max_missing: int = 1  # periods between the newest row and the window end
    macro_fresh_max_business_days: int = 5  # macro series are published with a lag
    max_abs_log_return: float = 0.4  # one-bar move worth a warning
    lookback_days: int = 21  # context read before the window for gaps, staleness, moves


@functools.cache
def us_federal_holidays() -> list[date]:
    """US federal holidays 1950-2100 as observed (Saturday ones on the Friday before, Sunday
    ones on the Monday after): the days FRED's business-day series have no value."""
    from pandas.tseries.holiday import USFederalHolidayCalendar

    days = USFederalHolidayCalendar().holidays("1950-01-01", "2100-12-31")
    return [d.date() for d in days]


def business_days_between(start: pl.Expr, end: pl.Expr) -> pl.Expr:
    """Business days (Mon-Fri, not US federal holidays) in [start, end)."""
    return pl.business_day_count(start, end, holidays=us_federal_holidays())


def weekend_entities(df: pl.DataFrame, table: str) -> set[str]:
    """Entities counted in calendar days: on-chain assets, and symbols with rows on weekends."""
    spec = table_spec(table)
    if df.is_empty():
        return set()
    if table == "onchain":
        return set(df[spec.entity_column].unique().to_list())
    weekend = df.filter(pl.col(spec.time_column).dt.weekday() >= 6)
    return set(weekend[spec.entity_column].unique().to_list())


def _as_date(value) -> date | None:
    if value is None:
        return None
    return value.date() if isinstance(value, datetime) else value


def _outcome(
    name: str,
    kwargs: dict,
    bad: pl.DataFrame,
    max_examples: int,
    severity: Literal["error", "warning"] = "error",
) -> ExpectationOutcome:
    return ExpectationOutcome(
        name, kwargs, bad.is_empty(), bad.height, bad.head(max_examples).to_dicts(), severity
    )


def _missing_periods(prev: pl.Expr, cur: pl.Expr, calendar: pl.Expr) -> pl.Expr:
    """Expected periods strictly between two dates: calendar days, or business days that are
    not US federal holidays."""
    return (
        pl.when(calendar)
        .then((cur - prev).dt.total_days() - 1)
        .otherwise(business_days_between(prev + pl.duration(days=1), cur))
    )


def check_gaps(
    table: str,
    df: pl.DataFrame,
    since: date | datetime | None = None,
    cfg: RuleConfig = RuleConfig(),
    max_examples: int = 5,
) -> ExpectationOutcome:
    """Missing days between consecutive rows of an entity (rows at or after `since` reported):
    calendar days for entities trading every day, up to `max_missing_calendar_days`; business
    days beyond US federal holidays otherwise, up to `max_missing_business_days`
    (`macro_max_missing_business_days` for macro series)."""
    spec = table_spec(table)
    ent, t = spec.entity_column, spec.time_column
    cal = sorted(weekend_entities(df, table))
    business = (
        cfg.macro_max_missing_business_days if table == "macro" else cfg.max_missing_business_days
    )
    d = (
        df.sort([ent, t])
        .with_columns(_d=pl.col(t).cast(pl.Date))
        .with_columns(_prev=pl.col("_d").shift(1).over(ent), _cal=pl.col(ent).is_in(cal))
    )
    d = d.with_columns(
        missing=_missing_periods(pl.col("_prev"), pl.col("_d"), pl.col("_cal")),
        calendar=pl.when(pl.col("_cal")).then(pl.lit("calendar")).otherwise(pl.lit("business")),
        allowed=pl.when(pl.col("_cal")).then(cfg.max_missing_calendar_days).otherwise(business),
    )
    bad = d.filter(pl.col("missing") > pl.col("allowed"))
    if since is not None:
        bad = bad.filter(pl.col("_d") >= _as_date(since))
    bad = bad.select(ent, pl.col("_prev").alias("previous"), t, "missing", "calendar")
    kwargs = {
        "column": t,
        "per": ent,
        "max_missing_calendar_days": cfg.max_missing_calendar_days,
        "max_missing_business_days": business,
        "not_counted": "US federal holidays",
    }
    return _outcome("mambacast_expect_no_gaps", kwargs, bad, max_examples)


def _last_new_value(df: pl.DataFrame) -> pl.DataFrame:
    """Macro rows with the date of the newest row whose value differs from the row before."""
    return (
        df.sort(["series", "date"])
        .with_columns(
            _changed=(pl.col("value") != pl.col("value").shift(1).over("series")).fill_null(True)
        )
        .with_columns(
            last_new_value=pl.when(pl.col("_changed"))
            .then(pl.col("date"))
            .otherwise(None)
            .forward_fill()
            .over("series")
        )
    )


def check_macro_staleness(
    df: pl.DataFrame,
    since: date | datetime | None = None,
    cfg: RuleConfig = RuleConfig(),
    max_examples: int = 5,
) -> ExpectationOutcome:
    """An error: rows of a macro series repeating the same value for more than N business days
    (a source that forward-fills, which real daily rates and indexes never do); rows at or
    after `since` reported."""
    n = cfg.macro_max_stale_business_days
    d = _last_new_value(df).with_columns(
        business_days_without_new_value=business_days_between(
            pl.col("last_new_value"), pl.col("date")
        )
    )
    cols = ["series", "date", "value", "last_new_value", "business_days_without_new_value"]
    bad = d.filter(pl.col("business_days_without_new_value") > n)
    if since is not None:
        bad = bad.filter(pl.col("date") >= _as_date(since))
    kwargs = {"column": "value", "per": "series", "max_stale_business_days": n}
    return _outcome("mambacast_expect_macro_not_stale", kwargs, bad.select(cols), max_examples)


def check_macro_current(
    df: pl.DataFrame,
    as_of: date | datetime,
    cfg: RuleConfig = RuleConfig(),
    max_examples: int = 5,
) -> ExpectationOutcome:
    """A warning: macro series whose newest new value is more than N business days before
    `as_of` (the window end): a series that ended or is published late. Not a defect of the
    table; the features carry such a series for a while, then drop it from the model."""
    n = cfg.macro_max_stale_business_days
    end = _as_date(as_of)
    newest = (
        _last_new_value(df)
        .group_by("series", maintain_order=True)
        .last()
        .with_columns(
            date=pl.lit(end),
            business_days_without_new_value=business_days_between(
                pl.col("last_new_value"), pl.lit(end)
            ),
        )
        .filter(pl.col("business_days_without_new_value") > n)
        .select("series", "date", "value", "last_new_value", "business_days_without_new_value")
    )
    kwargs = {"column": "value", "per": "series", "max_stale_business_days": n, "as_of": end}
    return _outcome("mambacast_expect_macro_current", kwargs, newest, max_examples, "warning")


def check_freshness(
    table: str,
    df: pl.DataFrame,
    window_end: date | datetime,
    cfg: RuleConfig = RuleConfig(),
    max_examples: int = 5,
) -> ExpectationOutcome:
    """The newest row of each entity is close to the window end (calendar or business days).

    An error for bars; a warning for on-chain and macro rows, whose sources lag or end early
    (the features carry their values for a while, then drop them from the model)."""
    spec = table_spec(table)
    ent, t = spec.entity_column, spec.time_column
    end = _as_date(window_end)
    allowed = cfg.macro_fresh_max_business_days if table == "macro" else cfg.fresh_max_missing
    severity = "warning" if table in RAGGED_TABLES else "error"
    kwargs = {"column": t, "per": ent, "window_end": str(window_end), "max_missing": allowed}
    name = "mambacast_expect_fresh_newest_partition"
    if df.is_empty():
        bad = pl.DataFrame({ent: [None], "newest": [None], "window_end": [end]})
        return _outcome(name, kwargs, bad, max_examples, severity)
    cal = sorted(weekend_entities(df, table))
    newest = df.group_by(ent).agg(newest=pl.col(t).max().cast(pl.Date)).sort(ent)
    newest = newest.with_columns(
        window_end=pl.lit(end),
        missing=_missing_periods(pl.col("newest"), pl.lit(end), pl.col(ent).is_in(cal)),
    )
    bad = newest.filter(pl.col("missing") > allowed)
    return _outcome(name, kwargs, bad, max_examples, severity)


def check_extreme_moves(
    df: pl.DataFrame,
    since: date | datetime | None = None,
    cfg: RuleConfig = RuleConfig(),
    max_examples: int = 5,
) -> ExpectationOutcome:
    """One-bar |log return| above the threshold (a warning: real markets do jump)."""
    d = (
        df.sort(["symbol", "ts"])
        .with_columns(previous_close=pl.col("close").shift(1).over("symbol"))
        .with_columns(log_return=(pl.col("close") / pl.col("previous_close")).log())
    )
    bad = d.filter(pl.col("log_return").abs() > cfg.max_abs_log_return)
    if since is not None:
        bad = bad.filter(pl.col("ts") >= since)
    bad = bad.select("symbol", "ts", "previous_close", "close", "log_return")
    kwargs = {"column": "close", "per": "symbol", "max_abs_log_return": cfg.max_abs_log_return}
    return _outcome("mambacast_expect_no_extreme_one_bar_move", kwargs, bad, max_examples)


# The rule a write does not break by itself: how close the newest row is to the window end says
# whether the source is current, not whether the write is sound (a historical file without
# `until`). The table's check judges it after the write; the audit of a staged write does not.
FRESHNESS_RULE = "mambacast_expect_fresh_newest_partition"


def check_bars(table: str, df: pl.DataFrame, max_examples: int = 5) -> ExpectationOutcome:
    """OHLC bars that cannot be: prices not positive and finite, high below the open, close or
    low, low above the open or close, volume negative or not finite. Polars, for the intraday
    tables (a year of minute bars is too many rows for the per-entity suite)."""
    prices = ["open", "high", "low", "close"]
    broken = (
        pl.any_horizontal([~pl.col(c).is_finite() | (pl.col(c) <= 0) for c in prices])
        | (pl.col("high") < pl.max_horizontal("open", "close", "low"))
        | (pl.col("low") > pl.min_horizontal("open", "close"))
        | ~pl.col("volume").is_finite()
        | (pl.col("volume") < 0)
    )
    bad = df.filter(broken).select("symbol", "ts", *prices, "volume")
    return _outcome("mambacast_expect_consistent_bars", {"table": table}, bad, max_examples)


def added_failures(after: QualityReport, before: QualityReport) -> list[ExpectationOutcome]:
    """The failures of `after` that `before` did not have: a rule that passed before, or fails
    on more rows now. What a write added, as opposed to what the table already held (a gap
    from an old outage, an entity no longer configured)."""
    old = {o.rule: o for o in before.outcomes}
    return [
        f
        for f in after.failures
        if f.rule not in old
        or old[f.rule].success
        or f.unexpected_count > old[f.rule].unexpected_count
    ]


def frame_reader(df: pl.DataFrame) -> Callable[[str, Any, Any], pl.DataFrame]:
    """A `read(table, lo, hi)` over a frame already read (rows of one table)."""
    return lambda table, lo=None, hi=None: _in_window(
        table, df, _start_of(table, lo), _start_of(table, hi)
    )


def _in_window(table: str, df: pl.DataFrame, start, end) -> pl.DataFrame:
    t = pl.col(table_spec(table).time_column)
    if start is not None:
        df = df.filter(t >= start)
    if end is not None:
        df = df.filter(t < end)
    return df


def _start_of(table: str, value):
    """A window bound in the type of the table's time column."""
    if value is None:
        return None
    return (
        _as_date(value)
        if table_spec(table).columns[table_spec(table).time_column] == pl.Date()
        else value
    )


def validate_rules(
    table: str,
    df: pl.DataFrame,
    window_start: date | datetime | None = None,
    window_end: date | datetime | None = None,
    cfg: RuleConfig = RuleConfig(),
) -> QualityReport:
    """Polars rules on a daily raw table: gaps and forward-filled macro values (errors), and
    with a window end, freshness (an error for bars, a warning for on-chain and macro rows)
    and macro series without a new value by the window end (a warning).

    `df` may hold context before the window (see RuleConfig.lookback_days); only problems at or
    after `window_start` are reported.
    """
    spec = table_spec(table)
    start = _start_of(table, window_start)
    outcomes = [check_gaps(table, df, start, cfg)]
    if table == "macro":
        outcomes.append(check_macro_staleness(df, start, cfg))
        if window_end is not None and df.height:
            outcomes.append(check_macro_current(df, window_end, cfg))
    if window_end is not None:
        outcomes.append(check_freshness(table, df, window_end, cfg))
    rows = _in_window(table, df, start, _start_of(table, window_end))
    entities = rows[spec.entity_column].unique(maintain_order=True).to_list()
    return QualityReport(table, rows.height, [str(e) for e in entities], outcomes)


def validate_window(
    table: str,
    read: Callable[[str, Any, Any], pl.DataFrame],
    start: datetime | None = None,
    end: datetime | None = None,
    cfg: RuleConfig = RuleConfig(),
) -> QualityReport:
    """The blocking suite of raw table `table` over [start, end) (the whole table when `start`
    is None): the Great Expectations suite on the window's rows and the polars rules with
    `cfg.lookback_days` of context before it. `read(table, lo, hi)` returns the rows with time
    in [lo, hi) (None: unbounded). The ingest runs it on its staged write before publishing it,
    the table's blocking check on the stored rows, so both judge the same rows the same way.
    """
    if start is None:
        context = rows = read(table, None, None)
    else:
        context = read(table, start - timedelta(days=cfg.lookback_days), end)
        rows = _in_window(table, context, _start_of(table, start), _start_of(table, end))
    return merge_reports(
        validate_table(table, rows), validate_rules(table, context, start, end, cfg)
    )


def validate_moves(
    df: pl.DataFrame, window_start: datetime | None = None, cfg: RuleConfig = RuleConfig()
) -> QualityReport:
    """The warning rule on bars: extreme one-bar moves at or after `window_start`."""
    rows = _in_window("ohlcv", df, window_start, None)
    entities = rows["symbol"].unique(maintain_order=True).to_list()
    return QualityReport(
        "ohlcv", rows.height, entities, [check_extreme_moves(df, window_start, cfg)]
    )


def outcomes_frame(outcomes: Sequence[ExpectationOutcome]) -> pl.DataFrame:
    """Outcomes as a table for the UI: the rule, its count of unexpected rows, a few examples."""
    return pl.DataFrame(
        [
            {"rule": o.rule, "rows": o.unexpected_count, "examples": str(o.examples[:3])}
            for o in outcomes
        ]
    )


def merge_reports(*reports: QualityReport) -> QualityReport:
    """One report of several (the suite and the polars rules of the same rows)."""
    first = reports[0]
    return QualityReport(
        first.table, first.rows, first.entities, [o for r in reports for o in r.outcomes]
    )


# ---------------------------------------------------------------------------------------------
# The features table (the lake's `features` snapshot); model columns come from its _meta.json.

NUMERIC_PANDAS_TYPES = ["float64", "float32", "int64", "int32", "int16", "int8", "bool"]


def validate_features(
    df: pl.DataFrame,
    model_columns: list[str],
    onchain_columns: Sequence[str] = ("hash_rate_ratio_30_60", "fees_per_tx"),
    warmup_bars: int = 250,
    max_examples: int = 5,
    *,
    carried_columns: Sequence[str] = (),
    max_missing_share: float = 0.0,
    onchain_symbols: Sequence[str] | None = None,
) -> QualityReport:
    """Schema and types, unique (symbol, ts), RSI in 0..100, and model columns not null after
    the first `warmup_bars` bars of each symbol. On-chain columns are checked on the symbols
    with on-chain data only: `onchain_symbols`, or when not given, the symbols trading on
    weekends (crypto).

    `carried_columns` (macro and on-chain values carried forward up to a limit, see
    ml.features.select_model_columns) may be null on up to `max_missing_share` of those bars,
    and must be set on each symbol's newest bar: the ragged-edge rule keeps only inputs that
    reach the end of the data."""
    import great_expectations.expectations as gxe

    present = [c for c in model_columns if c in df.columns]
    base = [gxe.ExpectColumnToExist(column=c) for c in ["symbol", "ts", *model_columns]]
    base += [
        gxe.ExpectColumnValuesToBeInTypeList(column=c, type_list=NUMERIC_PANDAS_TYPES)
        for c in present
    ]
    base += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("symbol", "ts")]
    base += [gxe.ExpectCompoundColumnsToBeUnique(column_list=["symbol", "ts"])]
    base += [
        gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=100)
        for c in present
        if c.upper().startswith("RSI")
    ]
    carried = set(carried_columns)

    def not_null(columns: list[str]) -> list:
        return [
            gxe.ExpectColumnValuesToNotBeNull(column=c, mostly=1.0 - max_missing_share)
            if c in carried and max_missing_share > 0
            else gxe.ExpectColumnValuesToNotBeNull(column=c)
            for c in columns
        ]

    dense = [c for c in present if c not in onchain_columns]
    chain = [c for c in present if c in onchain_columns]
    warm = (
        df.sort(["symbol", "ts"])
        .with_columns(_bar=pl.int_range(pl.len()).over("symbol"))
        .filter(pl.col("_bar") >= warmup_bars)
        .drop("_bar")
    )
    if onchain_symbols is None:
        onchain_symbols = sorted(weekend_entities(df, "ohlcv")) if df.height else []
    warm_chain = warm.filter(pl.col("symbol").is_in(list(onchain_symbols)))
    merged: dict[str, ExpectationOutcome] = {}
    label = {"table": "features"}
    runs = [
        ("features_schema", base, df),
        ("features_warm", not_null(dense), warm),
        ("features_warm_onchain", not_null(chain), warm_chain),
    ]
    for name, exps, part in runs:
        if exps and (part.height or name == "features_schema"):
            batch_def, suite = _suite(name, exps)
            _run_suite(batch_def, suite, part, merged, label, max_examples, keep=["symbol", "ts"])
    outcomes = list(merged.values())
    if carried:
        newest = [
            (warm, [c for c in dense if c in carried]),
            (warm_chain, [c for c in chain if c in carried]),
        ]
        outcomes.append(_carried_on_newest_bar(newest, max_examples))
    symbols = df["symbol"].unique(maintain_order=True).to_list() if "symbol" in df.columns else []
    return QualityReport("features", df.height, symbols, outcomes)


def _carried_on_newest_bar(
    parts: list[tuple[pl.DataFrame, list[str]]], max_examples: int
) -> ExpectationOutcome:
    """Carried columns set on each symbol's newest bar (of the rows given for them)."""
    bad = [
        rows.group_by("symbol", maintain_order=True)
        .last()
        .select("symbol", "ts", *[pl.col(c).is_null() for c in columns])
        .unpivot(index=["symbol", "ts"], variable_name="column", value_name="null")
        .filter(pl.col("null"))
        .drop("null")
        for rows, columns in parts
        if columns and rows.height
    ]
    found = pl.concat(bad) if bad else pl.DataFrame(schema={"symbol": pl.String})
    kwargs = {"columns": "carried model columns", "per": "symbol", "row": "newest bar"}
    return _outcome("mambacast_expect_carried_on_newest_bar", kwargs, found, max_examples)
