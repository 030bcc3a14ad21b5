"""LightGBM settings shared by the LightGBM forecaster's boosters (ml/forecasters/lightgbm.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GBMConfig:
    num_leaves: int = 15
    learning_rate: float = 0.03
    max_rounds: int = 400
    min_data_in_leaf: int = 80
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    early_stopping_rounds: int = 40
    seed: int = 7
    num_threads: int = 2

    def params(self, num_class: int) -> dict:
        return {
            "objective": "multiclass",
            "num_class": num_class,
            "metric": "multi_logloss",
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1,
            "lambda_l2": self.lambda_l2,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "num_threads": self.num_threads,
            "verbosity": -1,
        }
