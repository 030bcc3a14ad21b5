"""The data layer: source connectors, the DuckDB store, the Parquet lake and the artifact store.

Nothing here imports dagster; every piece is usable from a plain Python session.
"""

from warehouse.artifacts import ArtifactStore
from warehouse.lake import Lake
from warehouse.paths import DataPaths
from warehouse.store import Warehouse

__all__ = ["ArtifactStore", "DataPaths", "Lake", "Warehouse"]
