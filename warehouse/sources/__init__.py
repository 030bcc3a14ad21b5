"""Source connectors: one contract, `fetch(start, end) -> polars.DataFrame` in a table's schema."""

from warehouse.sources.base import Source, SourceError, make_source, registered_sources

__all__ = ["Source", "SourceError", "make_source", "registered_sources"]
