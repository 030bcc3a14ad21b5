"""Data-quality suites for the raw tables, run with Great Expectations 1.x.

Each table has one suite; it is validated per entity (symbol, asset or series) so that
"timestamps unique and increasing" means per symbol, as it should. Great Expectations is
imported lazily: it takes seconds to import and only the checks need it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import polars as pl

from warehouse.schema import TableSpec, table_spec


@dataclass
class ExpectationOutcome:
    expectation: str
    kwargs: dict[str, Any]
    success: bool
    unexpected_count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)  # offending rows, with entity

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
        return all(o.success for o in self.outcomes)

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def summary(self) -> str:
        if self.success:
            return f"{self.table}: {len(self.outcomes)} expectations passed on {self.rows} rows"
        lines = [
            f"{self.table}: {len(self.failures)} of {len(self.outcomes)} expectations failed "
            f"on {self.rows} rows"
        ]
        for f in self.failures:
            lines.append(f"- {f.rule}: {f.unexpected_count} rows, e.g. {f.examples[:3]}")
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


@dataclass(frozen=True)
class RuleConfig:
    max_missing_calendar_days: int = 0  # entities trading every day (crypto, on-chain)
    max_missing_business_days: int = 2  # stocks and macro series: tolerates holidays
    macro_max_stale_business_days: int = 10  # no new macro value for longer than this
    fresh_max_missing: int = 1  # periods between the newest row and the window end
    macro_fresh_max_business_days: int = 5  # macro series are published with a lag
    max_abs_log_return: float = 0.4  # one-bar move worth a warning
    lookback_days: int = 21  # context read before the window for gaps, staleness, moves


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


def _outcome(name: str, kwargs: dict, bad: pl.DataFrame, max_examples: int) -> ExpectationOutcome:
    return ExpectationOutcome(
        name, kwargs, bad.is_empty(), bad.height, bad.head(max_examples).to_dicts()
    )


def _missing_periods(prev: pl.Expr, cur: pl.Expr, calendar: pl.Expr) -> pl.Expr:
    """Expected periods strictly between two dates: calendar days or business days."""
    return (
        pl.when(calendar)
        .then((cur - prev).dt.total_days() - 1)
        .otherwise(pl.business_day_count(prev + pl.duration(days=1), cur))
    )


def check_gaps(
    table: str,
    df: pl.DataFrame,
    since: date | datetime | None = None,
    cfg: RuleConfig = RuleConfig(),
    max_examples: int = 5,
) -> ExpectationOutcome:
    """Missing days between consecutive rows of an entity (rows at or after `since` reported)."""
    spec = table_spec(table)
    ent, t = spec.entity_column, spec.time_column
    cal = sorted(weekend_entities(df, table))
    d = (
        df.sort([ent, t])
        .with_columns(_d=pl.col(t).cast(pl.Date))
        .with_columns(_prev=pl.col("_d").shift(1).over(ent), _cal=pl.col(ent).is_in(cal))
    )
    d = d.with_columns(
        missing=_missing_periods(pl.col("_prev"), pl.col("_d"), pl.col("_cal")),
        calendar=pl.when(pl.col("_cal")).then(pl.lit("calendar")).otherwise(pl.lit("business")),
        allowed=pl.when(pl.col("_cal"))
        .then(cfg.max_missing_calendar_days)
        .otherwise(cfg.max_missing_business_days),
    )
    bad = d.filter(pl.col("missing") > pl.col("allowed"))
    if since is not None:
        bad = bad.filter(pl.col("_d") >= _as_date(since))
    bad = bad.select(ent, pl.col("_prev").alias("previous"), t, "missing", "calendar")
    kwargs = {
        "column": t,
        "per": ent,
        "max_missing_calendar_days": cfg.max_missing_calendar_days,
        "max_missing_business_days": cfg.max_missing_business_days,
    }
    return _outcome("mambacast_expect_no_gaps", kwargs, bad, max_examples)


def check_macro_staleness(
    df: pl.DataFrame,
    as_of: date | datetime | None = None,
    since: date | datetime | None = None,
    cfg: RuleConfig = RuleConfig(),
    max_examples: int = 5,
) -> ExpectationOutcome:
    """Macro series without a new value (a new row with a changed value) for more than N
    business days: within the rows (a forward-filled value), and up to `as_of` (the window end)."""
    n = cfg.macro_max_stale_business_days
    d = (
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
    d = d.with_columns(
        business_days_without_new_value=pl.business_day_count(
            pl.col("last_new_value"), pl.col("date")
        )
    )
    cols = ["series", "date", "value", "last_new_value", "business_days_without_new_value"]
    bad = d.filter(pl.col("business_days_without_new_value") > n)
    if since is not None:
        bad = bad.filter(pl.col("date") >= _as_date(since))
    bad = bad.select(cols)
    if as_of is not None and d.height:
        end = _as_date(as_of)
        newest = (
            d.group_by("series", maintain_order=True)
            .last()
            .with_columns(
                business_days_without_new_value=pl.business_day_count(
                    pl.col("last_new_value"), pl.lit(end)
                )
            )
            .filter(pl.col("business_days_without_new_value") > n)
            .with_columns(date=pl.lit(end))
            .select(cols)
        )
        bad = pl.concat([bad, newest.cast(bad.schema)])
    kwargs = {"column": "value", "per": "series", "max_stale_business_days": n, "as_of": as_of}
    return _outcome("mambacast_expect_macro_not_stale", kwargs, bad, max_examples)


def check_freshness(
    table: str,
    df: pl.DataFrame,
    window_end: date | datetime,
    cfg: RuleConfig = RuleConfig(),
    max_examples: int = 5,
) -> ExpectationOutcome:
    """The newest row of each entity is close to the window end (calendar or business days)."""
    spec = table_spec(table)
    ent, t = spec.entity_column, spec.time_column
    end = _as_date(window_end)
    allowed = cfg.macro_fresh_max_business_days if table == "macro" else cfg.fresh_max_missing
    kwargs = {"column": t, "per": ent, "window_end": str(window_end), "max_missing": allowed}
    if df.is_empty():
        bad = pl.DataFrame({ent: [None], "newest": [None], "window_end": [end]})
        return _outcome("mambacast_expect_fresh_newest_partition", kwargs, bad, max_examples)
    cal = sorted(weekend_entities(df, table))
    newest = df.group_by(ent).agg(newest=pl.col(t).max().cast(pl.Date)).sort(ent)
    newest = newest.with_columns(
        window_end=pl.lit(end),
        missing=_missing_periods(pl.col("newest"), pl.lit(end), pl.col(ent).is_in(cal)),
    )
    bad = newest.filter(pl.col("missing") > allowed)
    return _outcome("mambacast_expect_fresh_newest_partition", kwargs, bad, max_examples)


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
    """Blocking polars rules on a daily raw table: gaps, macro staleness, freshness.

    `df` may hold context before the window (see RuleConfig.lookback_days); only problems at or
    after `window_start` are reported. Freshness is checked when a window end is given.
    """
    spec = table_spec(table)
    start = _start_of(table, window_start)
    outcomes = [check_gaps(table, df, start, cfg)]
    if table == "macro":
        outcomes.append(check_macro_staleness(df, window_end, start, cfg))
    if window_end is not None:
        outcomes.append(check_freshness(table, df, window_end, cfg))
    rows = _in_window(table, df, start, _start_of(table, window_end))
    entities = rows[spec.entity_column].unique(maintain_order=True).to_list()
    return QualityReport(table, rows.height, [str(e) for e in entities], outcomes)


def validate_moves(
    df: pl.DataFrame, window_start: datetime | None = None, cfg: RuleConfig = RuleConfig()
) -> QualityReport:
    """The warning rule on bars: extreme one-bar moves at or after `window_start`."""
    rows = _in_window("ohlcv", df, window_start, None)
    entities = rows["symbol"].unique(maintain_order=True).to_list()
    return QualityReport(
        "ohlcv", rows.height, entities, [check_extreme_moves(df, window_start, cfg)]
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
    onchain_columns: tuple[str, ...] = ("hash_rate_ratio_30_60", "fees_per_tx"),
    warmup_bars: int = 250,
    max_examples: int = 5,
) -> QualityReport:
    """Schema and types, unique (symbol, ts), RSI in 0..100, and model columns not null after
    the first `warmup_bars` bars of each symbol (on-chain columns: only on symbols trading on
    weekends, i.e. crypto; other symbols have no on-chain data)."""
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
    dense = [c for c in present if c not in onchain_columns]
    chain = [c for c in present if c in onchain_columns]
    warm = (
        df.sort(["symbol", "ts"])
        .with_columns(_bar=pl.int_range(pl.len()).over("symbol"))
        .filter(pl.col("_bar") >= warmup_bars)
        .drop("_bar")
    )
    crypto = sorted(weekend_entities(df, "ohlcv")) if df.height else []
    merged: dict[str, ExpectationOutcome] = {}
    label = {"table": "features"}
    runs = [
        ("features_schema", base, df),
        ("features_warm", [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in dense], warm),
        (
            "features_warm_onchain",
            [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in chain],
            warm.filter(pl.col("symbol").is_in(crypto)),
        ),
    ]
    for name, exps, part in runs:
        if exps and (part.height or name == "features_schema"):
            batch_def, suite = _suite(name, exps)
            _run_suite(batch_def, suite, part, merged, label, max_examples, keep=["symbol", "ts"])
    symbols = df["symbol"].unique(maintain_order=True).to_list() if "symbol" in df.columns else []
    return QualityReport("features", df.height, symbols, list(merged.values()))
