"""A LightGBM direction classifier: the first real model, and a baseline Mamba2 must beat."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import polars as pl

GBM_CODE_VERSION = "1"


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


class DirectionGBM:
    """Multi-class probabilities for (down, flat, up) from a fixed list of feature columns."""

    def __init__(self, booster: lgb.Booster, features: list[str], num_class: int) -> None:
        self.booster = booster
        self.features = features
        self.num_class = num_class

    @classmethod
    def fit(
        cls,
        train: pl.DataFrame,
        val: pl.DataFrame,
        features: list[str],
        target: str,
        cfg: GBMConfig,
        num_class: int = 3,
        log: Callable[[str], None] = lambda _: None,
    ) -> DirectionGBM:
        """Train on `train`, early-stop on `val` log loss. Rows with a null target are dropped."""
        train = train.filter(pl.col(target).is_not_null())
        val = val.filter(pl.col(target).is_not_null())
        if train.height < 100 or val.height < 20:
            raise ValueError(
                f"Too few labelled rows to train: {train.height} train, {val.height} "
                "validation (need 100 and 20). Ingest a longer history."
            )
        dtrain = lgb.Dataset(_x(train, features), train[target].to_numpy(), free_raw_data=False)
        dval = lgb.Dataset(_x(val, features), val[target].to_numpy(), reference=dtrain)
        evals: dict = {}

        def progress(env: lgb.callback.CallbackEnv) -> None:
            if (env.iteration + 1) % 50 == 0:
                loss = env.evaluation_result_list[0][2]
                log(f"round {env.iteration + 1}/{cfg.max_rounds}: validation log loss {loss:.4f}")

        booster = lgb.train(
            cfg.params(num_class),
            dtrain,
            num_boost_round=cfg.max_rounds,
            valid_sets=[dval],
            valid_names=["val"],
            callbacks=[
                lgb.early_stopping(cfg.early_stopping_rounds, verbose=False),
                lgb.record_evaluation(evals),
                progress,
            ],
        )
        log(
            f"best round {booster.best_iteration}, validation log loss "
            f"{evals['val']['multi_logloss'][booster.best_iteration - 1]:.4f}"
        )
        return cls(booster, features, num_class)

    def predict_proba(self, df: pl.DataFrame) -> np.ndarray:
        missing = [c for c in self.features if c not in df.columns]
        if missing:
            raise ValueError(f"Input lacks model features {missing}")
        p = self.booster.predict(_x(df, self.features), num_iteration=self.booster.best_iteration)
        return np.asarray(p).reshape(len(df), self.num_class)

    def feature_importance(self) -> dict[str, float]:
        gain = self.booster.feature_importance("gain")
        return dict(
            sorted(zip(self.features, map(float, gain), strict=True), key=lambda kv: -kv[1])
        )

    def save(self, folder: Path) -> None:
        self.booster.save_model(
            str(folder / "model.txt"), num_iteration=self.booster.best_iteration
        )
        (folder / "features.json").write_text(
            json.dumps({"features": self.features, "num_class": self.num_class}, indent=2)
        )

    @classmethod
    def load(cls, folder: Path) -> DirectionGBM:
        meta = json.loads((folder / "features.json").read_text())
        booster = lgb.Booster(model_file=str(folder / "model.txt"))
        return cls(booster, meta["features"], meta["num_class"])


def config_dict(cfg: GBMConfig) -> dict:
    return {"model": "lightgbm_direction", "code_version": GBM_CODE_VERSION, **asdict(cfg)}


def _x(df: pl.DataFrame, features: list[str]) -> np.ndarray:
    return df.select(features).to_numpy().astype(np.float64)
