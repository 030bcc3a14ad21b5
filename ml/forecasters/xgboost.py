"""XGBoost for every target, on the same feature columns, label rows and targets as the
LightGBM forecaster (ml/forecasters/lightgbm.py): one booster per target (per horizon for the
returns), each trained with `xgboost.train` on the fold's training rows that have its label and
early-stopped on the fold's validation rows.

Objectives, and why:
- direction: `multi:softprob` over (down, flat, up), early-stopped on the validation log loss.
  `num_class` is always 3, so a class absent from the training rows still gets a column; the
  boosting starts from the Laplace-smoothed training class frequencies (one pseudo-count per
  class, as the climatology baseline; XGBoost's own intercept estimate would start such a
  class at about -9 in the margin), and probabilities are floored at `proba_floor` and
  renormalised, so a class the training rows never had costs a bounded log loss.
- quantiles: `reg:quantileerror` with `quantile_alpha` = both levels in ONE model (one tree per
  level and round, one early-stopping point on the mean validation pinball loss). The levels'
  trees are separate and can cross, so the predictions are sorted row-wise: q10 <= q90.
- sigma: `reg:gamma` (log link) on the forward sample VARIANCE `fwd_vol_<W>`^2, reading the log
  EWMA(0.94) variance as one more input, early-stopped on the validation gamma deviance; the
  forecast is sqrt of the predicted variance. Its trees are stumps (`sigma_max_depth` = 1,
  LightGBM's `sigma_num_leaves` = 2): an additive model of log variance. Why gamma on
  variance and why stumps: lightgbm.py's module docstring (the same reasoning and evidence
  apply; the choice was not re-tuned for XGBoost).
- returns: `reg:pseudohubererror` per horizon on `fwd_ret_<h>`, early-stopped on the
  validation RMSE, with `huber_slope` = `huber_k` robust standard deviations (1.4826 x MAD) of
  that horizon's training labels, as LightGBM's Huber threshold. The boosting starts from the
  training labels' median (XGBoost's one-Newton-step intercept estimate overshoots under the
  pseudo-Huber loss's small Hessians far from zero).

Missing feature values are passed as NaN: XGBoost learns a default direction per split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
import xgboost as xgb

from ml.forecasters.base import (
    ALL_TARGETS,
    DIRECTION,
    DIRECTION_COLUMNS,
    QUANTILES,
    RETURNS,
    SIGMA,
    FoldData,
    Forecaster,
    TargetSpec,
    register,
)
from ml.forecasters.lightgbm import (
    EWMA_INPUT,
    FAST_TREES,
    BoostingInputs,
    _robust_std,
    _Task,
    check_fitted_on,
    scored_matrices,
)

XGBOOST_FORECASTER_CODE_VERSION = "1"


@dataclass(frozen=True)
class XGBoostForecastConfig:
    """Settings shared by every booster; the schedule and sampling mirror LightGBM's
    FAST_TREES (a fold's boosters fit in a few seconds on one core).

    learning_rate, max_rounds, early_stopping_rounds: FAST_TREES' 0.05, 300, 30.
    max_depth: 4, i.e. at most 16 leaves, LightGBM's 15-leaf trees (`sigma_max_depth` for sigma).
    min_child_weight: the Hessian sum a leaf needs, XGBoost's stand-in for LightGBM's 80-row
      `min_data_in_leaf`: 40 is ~40 rows for the quantile and gamma boosters (Hessian ~1 a row),
      ~90 for direction (softmax Hessian 2p(1-p) ~0.44 at p ~ 1/3) and more for pseudo-Huber
      rows far from the fit.
    subsample, colsample_bytree, reg_lambda: LightGBM's bagging_fraction, feature_fraction and
      lambda_l2 (0.8, 0.8, 1.0).
    huber_k: the pseudo-Huber slope in robust standard deviations of each horizon's labels.
    sigma_max_depth: 1 (stumps; see the module docstring).
    proba_floor: the least direction probability before renormalising; 0.001 caps a row's log
      loss at ~6.9 nats. Boosted probabilities are fitted to the log loss and early-stopped, so
      this only guards a class the training rows (nearly) never had.
    seed, nthread: a fixed seed; one thread (the model step runs beside two sequence-training
      processes on 2 cores; see FAST_TREES in lightgbm.py).
    """

    learning_rate: float = FAST_TREES.learning_rate
    max_rounds: int = FAST_TREES.max_rounds
    early_stopping_rounds: int = FAST_TREES.early_stopping_rounds
    max_depth: int = 4
    min_child_weight: float = 40.0
    subsample: float = FAST_TREES.bagging_fraction
    colsample_bytree: float = FAST_TREES.feature_fraction
    reg_lambda: float = FAST_TREES.lambda_l2
    huber_k: float = 1.345
    sigma_max_depth: int = 1
    proba_floor: float = 1e-3
    seed: int = FAST_TREES.seed
    nthread: int = 1

    def __post_init__(self) -> None:
        if not self.huber_k > 0:
            raise ValueError(f"huber_k={self.huber_k}: use a positive threshold, e.g. 1.345")
        for name in ("max_depth", "sigma_max_depth", "max_rounds", "early_stopping_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name}={value!r}: use an integer >= 1")
        if not 0.0 < self.proba_floor < 1.0 / len(DIRECTION_COLUMNS):
            raise ValueError(f"proba_floor={self.proba_floor}: use a small positive, e.g. 0.001")

    def to_json(self) -> dict:
        return {
            "model": "xgboost",
            "code_version": XGBOOST_FORECASTER_CODE_VERSION,
            **asdict(self),
        }

    def params(self) -> dict:
        """The tree parameters every booster shares (objectives add theirs)."""
        return {
            "tree_method": "hist",
            "learning_rate": self.learning_rate,
            "max_depth": self.max_depth,
            "min_child_weight": self.min_child_weight,
            "subsample": self.subsample,
            "colsample_bytree": self.colsample_bytree,
            "reg_lambda": self.reg_lambda,
            "seed": self.seed,
            "nthread": self.nthread,
            "verbosity": 0,
        }


@register
class XGBoostForecaster(Forecaster):
    """Every target from the fold's feature columns with XGBoost (see the module docstring
    for the objectives). Deterministic for a seed."""

    name = "xgboost"
    targets = ALL_TARGETS

    def __init__(self, cfg: XGBoostForecastConfig = XGBoostForecastConfig()) -> None:
        self.cfg = cfg
        self._boosters: dict[str, xgb.Booster] = {}
        self._tasks: list[_Task] = []
        self._features: list[str] = []
        self._spec: TargetSpec | None = None
        self._anchor_fill, self._ewma_input = 0.0, False

    def fit(self, data: FoldData) -> XGBoostForecaster:
        """Train one booster per task on `data.train`, each on the rows with a non-null (for
        sigma: positive) label, early-stopped on `data.val`. Test rows are never read. Raises
        ValueError when a target has fewer than 100 training or 20 validation labelled rows."""
        inputs = BoostingInputs.of(data, _tasks(data.targets, data.train, self.cfg))
        boosters = {}
        for task in inputs.tasks:
            (y_train, keep_train), (y_val, keep_val) = inputs.labels[task.name]
            xt, xv = inputs.matrices(task)
            params = dict(task.params)
            if task.target == DIRECTION:
                params["base_score"] = _log_class_frequencies(y_train[keep_train])
            elif task.target == RETURNS:
                params["base_score"] = float(np.median(y_train[keep_train]))
            dtrain = xgb.QuantileDMatrix(xt[keep_train], y_train[keep_train], missing=np.nan)
            dval = xgb.QuantileDMatrix(xv[keep_val], y_val[keep_val], ref=dtrain, missing=np.nan)
            boosters[task.name] = xgb.train(
                params,
                dtrain,
                num_boost_round=self.cfg.max_rounds,
                evals=[(dval, "val")],
                early_stopping_rounds=self.cfg.early_stopping_rounds,
                verbose_eval=False,
            )
        self._boosters, self._tasks = boosters, inputs.tasks
        self._features, self._spec = inputs.features, data.targets
        self._anchor_fill, self._ewma_input = inputs.fill, inputs.has_anchor
        return self

    def predict(self, data: FoldData) -> pl.DataFrame:
        """`symbol`, `ts` of `data.scored` (same order) plus p_down/p_flat/p_up (summing to 1),
        the quantile columns (sorted row-wise, so q10 <= q90), `sigma` (> 0) and ret_<h>."""
        check_fitted_on(self, data)
        spec = self._spec
        rows = data.scored
        x, xs = scored_matrices(data, self._features, self._ewma_input, self._anchor_fill)
        raw = {task.name: self._raw(task.name, xs if task.anchored else x) for task in self._tasks}
        columns: dict[str, np.ndarray] = {}
        proba = raw[DIRECTION].reshape(rows.height, len(DIRECTION_COLUMNS)).astype(np.float64)
        proba = np.clip(proba, self.cfg.proba_floor, None)
        proba /= proba.sum(axis=1, keepdims=True)
        columns.update(zip(DIRECTION_COLUMNS, proba.T, strict=True))
        # the booster's output columns follow quantile_alpha, i.e. the sorted levels
        levels = sorted(zip(spec.quantile_levels, spec.quantile_columns, strict=True))
        quantiles = np.sort(raw[QUANTILES].reshape(rows.height, len(levels)), axis=1)
        columns.update(zip([col for _, col in levels], quantiles.T, strict=True))
        columns["sigma"] = np.sqrt(raw["sigma"])
        for h in spec.return_horizons:
            columns[spec.return_column(h)] = raw[spec.return_column(h)]
        ordered = [c for target in ALL_TARGETS for c in spec.prediction_columns(target)]
        return rows.select("symbol", "ts").with_columns(
            [pl.Series(c, np.asarray(columns[c], dtype=np.float64)) for c in ordered]
        )

    def feature_importance(self) -> dict[str, dict[str, float]]:
        """Per target, each feature's share of the total split gain of that target's boosters
        up to their best round, largest first. Shares sum to 1 (all 0 when no booster split)."""
        if not self._boosters:
            raise RuntimeError("feature_importance before fit: call fit(data) first")
        out = {}
        for target in ALL_TARGETS:
            tasks = [t for t in self._tasks if t.target == target]
            names = self._features + (
                [EWMA_INPUT] if self._ewma_input and tasks[0].anchored else []
            )
            gain = np.zeros(len(names))
            for task in tasks:
                booster = self._boosters[task.name]
                score = booster[: booster.best_iteration + 1].get_score(
                    importance_type="total_gain"
                )
                for key, value in score.items():  # keys are f<column index>
                    gain[int(key[1:])] += value
            total = float(gain.sum())
            shares = gain / total if total > 0 else np.zeros(len(gain))
            out[target] = dict(
                sorted(zip(names, map(float, shares), strict=True), key=lambda kv: -kv[1])
            )
        return out

    def best_rounds(self) -> dict[str, int]:
        """The early-stopped number of rounds of each booster (its best iteration + 1), by its
        prediction column (`direction` / `quantiles` for the multi-column boosters)."""
        return {name: int(b.best_iteration) + 1 for name, b in self._boosters.items()}

    def fit_info(self) -> dict:
        """The best rounds and the rounds trained (best + patience, or max_rounds) of each
        booster (`fit_registered` records this beside the fit seconds)."""
        if not self._boosters:
            return {}
        return {
            "best_rounds": self.best_rounds(),
            "rounds_trained": {n: int(b.num_boosted_rounds()) for n, b in self._boosters.items()},
        }

    def _raw(self, name: str, x: np.ndarray) -> np.ndarray:
        booster = self._boosters[name]
        return np.asarray(
            booster.inplace_predict(
                x, iteration_range=(0, booster.best_iteration + 1), missing=np.nan
            )
        )


def _log_class_frequencies(y: np.ndarray) -> list[float]:
    """log of the Laplace-smoothed class frequencies (one pseudo-count per class): the softmax
    margins of the training class shares, finite for a class with no training row."""
    counts = np.bincount(y.astype(np.int64), minlength=len(DIRECTION_COLUMNS))
    freq = (counts + 1.0) / (counts.sum() + len(DIRECTION_COLUMNS))
    return [float(v) for v in np.log(freq)]


def _tasks(spec: TargetSpec, train: pl.DataFrame, cfg: XGBoostForecastConfig) -> list[_Task]:
    shared = cfg.params()
    tasks = [
        _Task(
            DIRECTION,
            DIRECTION,
            spec.direction,
            {
                **shared,
                "objective": "multi:softprob",
                "num_class": len(DIRECTION_COLUMNS),
                "eval_metric": "mlogloss",
            },
        ),
        _Task(
            QUANTILES,
            QUANTILES,
            spec.quantile,
            {
                **shared,
                "objective": "reg:quantileerror",
                "quantile_alpha": sorted(float(q) for q in spec.quantile_levels),
                "eval_metric": "quantile",
            },
        ),
        _Task(
            "sigma",
            SIGMA,
            spec.sigma,
            {
                **shared,
                "objective": "reg:gamma",
                "eval_metric": "gamma-deviance",
                "max_depth": cfg.sigma_max_depth,
            },
            squared=True,
            anchored=True,
        ),
    ]
    for h in spec.return_horizons:
        label = spec.return_label(h)
        slope = cfg.huber_k * _robust_std(train[label], label)
        params = {
            **shared,
            "objective": "reg:pseudohubererror",
            "huber_slope": slope,
            "eval_metric": "rmse",
        }
        tasks.append(_Task(spec.return_column(h), RETURNS, label, params))
    return tasks
