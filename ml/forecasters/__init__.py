"""Forecasters: every model and baseline behind one contract (`base.Forecaster`), each in its
own module that registers itself. Importing this package registers them all."""

from ml.forecasters import (  # noqa: F401 (registers)
    climatology,
    ewma,
    garch,
    har,
    historical_quantiles,
    persistence,
    zero_return,
)
from ml.forecasters.base import (
    ALL_TARGETS,
    DIRECTION,
    QUANTILES,
    REGISTRY,
    RETURNS,
    SIGMA,
    FoldData,
    Forecaster,
    TargetSpec,
    fold_data,
    register,
)

__all__ = [
    "ALL_TARGETS",
    "DIRECTION",
    "QUANTILES",
    "REGISTRY",
    "RETURNS",
    "SIGMA",
    "FoldData",
    "Forecaster",
    "TargetSpec",
    "fold_data",
    "register",
]
from ml.forecasters import lightgbm, random_forest, xgboost  # noqa: F401 (registers)
