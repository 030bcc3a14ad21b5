"""Pure Python / polars / PyTorch: features, labels, splits, models, metrics, backtests.

Nothing here imports dagster.
"""
