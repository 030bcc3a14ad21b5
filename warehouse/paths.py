"""The one place that knows where Mambacast keeps its data on disk."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = "data"
# one folder or file name that a config value (a model name, a version) may become
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class PathOutsideError(ValueError):
    """A path built from configuration would lie outside the folder it must stay in."""


def check_inside(root: str | Path, path: str | Path, what: str = "path") -> Path:
    """`path` resolved (symbolic links and `..` followed), after checking it lies in `root`.

    Every writer that builds a path from configuration (lake partitions, artifact versions,
    forecast states) calls this, so no symbol, name or version can write outside the data
    directory. Raises PathOutsideError naming the input and the fix.
    """
    base = Path(root).expanduser().resolve()
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_relative_to(base):
        raise PathOutsideError(
            f"Refusing to write {what} {str(path)!r}: it resolves to {resolved}, outside "
            f"{base}. Use plain names (letters, digits, . _ -) without '..', '/' or an "
            "absolute path in the option it came from."
        )
    return resolved


def check_segment(value: str, what: str) -> str:
    """`value` when it can be one folder or file name (no '/', '..', NUL); else ValueError."""
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value) or ".." in value:
        raise PathOutsideError(
            f"Invalid {what} {value!r}: use letters, digits, . _ - (at most 128, not starting "
            "with '.', no '..'), so it stays one folder inside the data directory"
        )
    return value


@dataclass(frozen=True)
class DataPaths:
    """Every storage location derives from one data directory.

    data/
      warehouse.duckdb        raw tables (ohlcv, onchain, macro) and views over the lake
      warehouse.duckdb.lock   serializes writers across processes
      lake/<table>/...        Parquet, hive layout
      artifacts/<kind>/...    immutable versioned model and backtest outputs
      forecast_state/         the recurrent states latest_forecast carries from day to day
      dagster_home/           the Dagster instance (runs, event log) the UI reads
    """

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> DataPaths:
        """The data directory `root` (relative to the working directory unless absolute).

        Raises ValueError for an empty path, a NUL, or the filesystem root: everything is
        written under this folder, so it must be one chosen on purpose.
        """
        text = str(root)
        if not text.strip() or "\x00" in text:
            raise ValueError(
                f"Invalid data directory {text!r}: set data_dir (or MAMBACAST_DATA_DIR) to a "
                "folder, e.g. 'data'"
            )
        path = Path(text).expanduser().resolve()
        if path == Path(path.anchor):
            raise ValueError(
                f"Refusing the filesystem root {path} as the data directory: set data_dir (or "
                "MAMBACAST_DATA_DIR) to a folder of its own, e.g. 'data'"
            )
        return cls(path)

    def inside(self, path: str | Path, what: str = "path") -> Path:
        """`path` resolved, after checking that it lies in the data directory (check_inside)."""
        return check_inside(self.root, path, what)

    @property
    def duckdb_file(self) -> Path:
        return self.root / "warehouse.duckdb"

    @property
    def lock_file(self) -> Path:
        return self.root / "warehouse.duckdb.lock"

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def forecast_state(self) -> Path:
        return self.root / "forecast_state"

    def forecast_state_file(self, model: str, version: str) -> Path:
        """Where latest_forecast keeps `model`'s recurrent state for artifact `version`: both
        come from configuration and artifacts, so both are checked to stay one folder each."""
        path = (
            self.forecast_state
            / check_segment(model, "model name")
            / f"{check_segment(version, 'model version')}.pt"
        )
        # inside the data directory (a forecast_state folder linked elsewhere is refused) and
        # inside forecast_state itself (a model folder linked into the lake or artifacts is too)
        self.inside(path, "the forecast state")
        return check_inside(self.forecast_state, path, "the forecast state")

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"
