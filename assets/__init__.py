"""Dagster assets and checks: thin adapters over `warehouse/` and `ml/`, one module per stage."""
