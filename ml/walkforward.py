"""Walk-forward folds: a model per test window, trained only on what came before it.

For each fold, in calendar time:

    [train_start ........ val_start)[val_start .... test_start)[test_start .... test_end)
     training rows                   validation rows             test rows (predicted only)

- Test windows are consecutive calendar windows of `step_months` (12: yearly folds keyed "2021",
  3 or 6: keyed by the first month, "2021-04"). Every test row belongs to exactly one fold.
- Validation is the `val_days` before the test start; training is everything before that
  (expanding) or the last `train_days` before it (rolling).
- Purge: a training row is kept only if its whole label window (`label_end_ts`, the last bar
  any of its labels looks at: the longest label horizon) ends before `val_start - embargo`;
  a validation row only if it ends before `test_start - embargo`. So no training or validation
  label overlaps the next segment, and the gap between segments is at least the longest label
  horizon plus the embargo.
- Test rows are kept whole; those whose labels run past the data are predicted but not scored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta

import polars as pl

from ml.dataset import TEST, TRAIN, VAL

FOLD_CODE_VERSION = "1"


@dataclass(frozen=True)
class WalkForwardConfig:
    step_months: int = 12  # test window length and step: 12 yearly, 6, 3 quarterly, 1 monthly
    window: str = "expanding"  # or "rolling" (train_days long)
    train_days: int = 0  # rolling windows only
    val_days: int = 365
    embargo_days: int = 5  # extra days beyond the purge of whole label windows
    min_train_rows: int = 500  # per fold, after the purge, over all symbols

    def __post_init__(self) -> None:
        if self.step_months not in (1, 2, 3, 4, 6, 12):
            raise ValueError(
                f"step_months={self.step_months}: use a divisor of 12 (1, 2, 3, 4, 6 or 12) "
                "so test windows tile each year"
            )
        if self.window not in ("expanding", "rolling"):
            raise ValueError(f"window={self.window!r}: use 'expanding' or 'rolling'")
        if self.window == "rolling" and self.train_days < 2 * self.val_days:
            raise ValueError(
                f"a rolling window needs train_days >= 2 x val_days ({2 * self.val_days}); "
                f"got {self.train_days}"
            )
        if self.val_days < 30 or self.embargo_days < 0 or self.min_train_rows < 1:
            raise ValueError(
                f"val_days={self.val_days} (>= 30), embargo_days={self.embargo_days} (>= 0) and "
                f"min_train_rows={self.min_train_rows} (>= 1) are out of range"
            )

    def to_json(self) -> dict:
        return {"code_version": FOLD_CODE_VERSION, **asdict(self)}


@dataclass(frozen=True)
class Fold:
    key: str
    train_start: datetime
    val_start: datetime
    test_start: datetime
    test_end: datetime
    embargo: timedelta

    @property
    def fit_end(self) -> datetime:
        """No fitted parameter may use information at or after this time."""
        return self.val_start - self.embargo

    @property
    def val_end(self) -> datetime:
        """No choice made on validation rows may use information at or after this time."""
        return self.test_start - self.embargo

    def to_json(self) -> dict[str, str]:
        return {
            "key": self.key,
            "train_start": self.train_start.isoformat(),
            "val_start": self.val_start.isoformat(),
            "test_start": self.test_start.isoformat(),
            "test_end": self.test_end.isoformat(),
            "embargo_days": str(self.embargo.days),
        }

    @classmethod
    def from_json(cls, d: dict) -> Fold:
        return cls(
            d["key"],
            datetime.fromisoformat(d["train_start"]),
            datetime.fromisoformat(d["val_start"]),
            datetime.fromisoformat(d["test_start"]),
            datetime.fromisoformat(d["test_end"]),
            timedelta(days=int(d["embargo_days"])),
        )


def fold_key(test_start: date, step_months: int) -> str:
    return f"{test_start:%Y}" if step_months == 12 else f"{test_start:%Y-%m}"


def _add_months(d: datetime, months: int) -> datetime:
    m = d.month - 1 + months
    return d.replace(year=d.year + m // 12, month=m % 12 + 1, day=1)


def fold_for_key(key: str, cfg: WalkForwardConfig, data_start: datetime) -> Fold:
    """The fold whose test window starts at `key` ("2021" or "2021-04")."""
    try:
        start = datetime.strptime(key, "%Y" if cfg.step_months == 12 else "%Y-%m")
    except ValueError:
        raise ValueError(
            f"Fold key {key!r} does not match step_months={cfg.step_months} "
            f"({'YYYY' if cfg.step_months == 12 else 'YYYY-MM'})"
        ) from None
    if (start.month - 1) % cfg.step_months:
        raise ValueError(
            f"Fold key {key!r} is not a window start for step_months={cfg.step_months}"
        )
    val_start = start - timedelta(days=cfg.val_days)
    train_start = (
        data_start if cfg.window == "expanding" else val_start - timedelta(days=cfg.train_days)
    )
    return Fold(
        key,
        max(train_start, data_start),
        val_start,
        start,
        _add_months(start, cfg.step_months),
        timedelta(days=cfg.embargo_days),
    )


def assign_fold(rows: pl.DataFrame, fold: Fold) -> pl.DataFrame:
    """The rows of one fold with `split` set and purged rows removed (rows after the test window
    and before the training window are dropped). `rows` needs `ts` and `label_end_ts`."""
    ts, end = pl.col("ts"), pl.col("label_end_ts")
    split = (
        pl.when(ts < fold.val_start)
        .then(pl.lit(TRAIN))
        .when(ts < fold.test_start)
        .then(pl.lit(VAL))
        .otherwise(pl.lit(TEST))
    )
    keep = (
        pl.when(pl.col("split") == TRAIN)
        .then(end.is_not_null() & (end < fold.fit_end))
        .when(pl.col("split") == VAL)
        .then(end.is_not_null() & (end < fold.val_end))
        .otherwise(True)
    )
    return (
        rows.filter((ts >= fold.train_start) & (ts < fold.test_end))
        .with_columns(split=split)
        .filter(keep)
    )


def walk_forward_folds(rows: pl.DataFrame, cfg: WalkForwardConfig) -> list[Fold]:
    """Every fold the data supports: a test window with at least one row and at least
    `min_train_rows` training rows left after the purge, and validation rows."""
    if rows.is_empty():
        raise ValueError("No dataset rows: ingest data and materialize features and labels first")
    first, last = rows["ts"].min(), rows["ts"].max()
    start = datetime(first.year, 1, 1)
    folds = []
    while start <= last:
        fold = fold_for_key(fold_key(start, cfg.step_months), cfg, first)
        part = assign_fold(rows, fold).group_by("split").len()
        counts = dict(zip(part["split"], part["len"], strict=True))
        if counts.get(TRAIN, 0) >= cfg.min_train_rows and counts.get(VAL, 0) and counts.get(TEST):
            folds.append(fold)
        start = _add_months(start, cfg.step_months)
    if not folds:
        raise ValueError(
            f"No walk-forward fold fits {rows.height} rows from {first:%Y-%m-%d} to "
            f"{last:%Y-%m-%d} with {cfg}: ingest a longer history or lower min_train_rows / "
            "val_days"
        )
    return folds
