"""Data-quality suites for the raw tables, run with Great Expectations 1.x.

Each table has one suite; it is validated per entity (symbol, asset or series) so that
"timestamps unique and increasing" means per symbol, as it should. Great Expectations is
imported lazily: it takes seconds to import and only the checks need it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
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


@functools.cache
def _batch_definition(table: str):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    spec = table_spec(table)
    asset = ctx.data_sources.add_pandas(f"mambacast_{table}").add_dataframe_asset(table)
    suite = gx.ExpectationSuite(name=f"{table}_quality")
    for exp in _expectations(spec):
        suite.add_expectation(exp)
    return asset.add_batch_definition_whole_dataframe("whole"), ctx.suites.add(suite)


def validate_table(table: str, df: pl.DataFrame, max_examples: int = 5) -> QualityReport:
    """Validate `df` (rows of raw table `table`, any window) against the table's suite."""
    spec = table_spec(table)
    batch_def, suite = _batch_definition(table)
    merged: dict[str, ExpectationOutcome] = {}
    entities = df[spec.entity_column].unique(maintain_order=True).to_list() if df.height else []
    for entity in entities or [None]:
        part = df if entity is None else df.filter(pl.col(spec.entity_column) == entity)
        pdf = part.to_pandas()
        result = batch_def.get_batch(batch_parameters={"dataframe": pdf}).validate(
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
            rows = part.with_row_index("_row")[
                [i for i in idx[:max_examples] if isinstance(i, int)]
            ]
            if rows.height:
                out.examples += rows.drop("_row").to_dicts()[: max_examples - len(out.examples)]
            elif "observed_value" in res:
                out.examples.append({spec.entity_column: entity, "observed": res["observed_value"]})
    return QualityReport(table, df.height, [str(e) for e in entities], list(merged.values()))
