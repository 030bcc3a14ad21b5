"""Random forests (scikit-learn) for every target, on the same feature columns, label rows and
targets as the LightGBM forecaster (ml/forecasters/lightgbm.py): each forest is fitted on the
fold's training rows that have its label. Nothing is early-stopped: a forest does not overfit
as trees are added (more trees only lower the variance of the average), so the validation
rows are never read and the number of trees is fixed (`n_estimators`).

Forests, and why:
- direction: a RandomForestClassifier over (down, flat, up). Its probabilities are class
  shares in the leaves averaged over the trees, and are often exactly 0 for a class that no
  training row near this one had; they are floored at `proba_floor` and renormalised so the
  log loss stays finite (see `RandomForestForecastConfig`). A class absent from the training
  rows gets the floor.
- quantiles: a quantile regression forest (Meinshausen 2006, "Quantile Regression Forests",
  JMLR 7): a RandomForestRegressor on the quantile label fixes the partitions; the conditional
  distribution at x is then the weighted empirical distribution of the training labels, row i
  weighing w_i(x) = 1/T sum_t 1{i in leaf_t(x)} / |leaf_t(x)| (every training row is dropped
  down every tree, as in the paper, not only the tree's bootstrap sample), and q_a(x) =
  inf {y : F(y | x) >= a}. Both levels are read off the same distribution function, so
  q10 <= q90 by construction.
- sigma: a RandomForestRegressor (squared error) on the forward sample VARIANCE
  `fwd_vol_<W>`^2, reading the log EWMA(0.94) variance as one more input exactly as LightGBM's
  sigma booster does; the forecast is sqrt of the predicted mean variance (a mean of positive
  leaf means, so positive). The mean variance, not a mean log volatility, is what QLIKE
  rewards (see lightgbm.py).
- returns: ONE multi-output RandomForestRegressor over every return horizon, on the rows that
  have all of them (the longest horizon's rows: the shorter ones are labelled wherever it is).
  One forest instead of one per horizon costs a quarter of the time, and the horizons share
  their predictive structure (a 30-bar return contains the 1-, 5- and 10-bar ones). Each
  horizon's label is divided by its training robust standard deviation (1.4826 x MAD) before
  fitting, so every horizon weighs the same in the split criterion (the raw 30-bar return's
  variance would otherwise choose every split), and winsorized at `return_clip` of them: the
  squared-error criterion has no Huber loss, and clipping keeps a handful of crash days from
  steering the splits, as LightGBM's Huber objective does. Predictions are scaled back.

Missing feature values are passed as NaN: scikit-learn's forests split on them natively.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
from scipy import sparse
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

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
    MIN_TRAIN_ROWS,
    _log_ewma_variance,
    _on_rows,
    _robust_std,
    _x,
)

RANDOM_FOREST_FORECASTER_CODE_VERSION = "1"
_QRF_CHUNK = 2048  # predicted rows per dense weight block (chunk x training rows float64)


@dataclass(frozen=True)
class RandomForestForecastConfig:
    """Settings shared by the four forests.

    n_estimators: trees per forest. 200 is past the point where more trees change the
      predictions noticeably (Probst & Boulesteix 2018) and keeps a 5,000-row fold's four forests
      within seconds on one core.
    min_samples_leaf: training rows per leaf. Neighbouring daily rows share most of their
      overlapping 90-bar label windows, so a leaf of a few rows is one market episode; 50 rows
      (LightGBM's leaves need 80, but each tree here sees only half the rows) make a leaf span
      several episodes and the quantile forest's leaf distributions tens of labels.
    max_features: features tried per split, scikit-learn's spelling ("sqrt", a fraction, an
      int). "sqrt" decorrelates the trees, which is what a forest's averaging needs on noisy
      labels, and keeps each split cheap (a fraction of 0.5 took 2.3x as long on a 40-column
      fold). On a few columns carrying a strong signal (the 4 of the planted test fold) it puts
      many splits on noise and widens the quantile band; a larger share suits such data.
    max_samples: the share of training rows each tree's bootstrap draws. Half the rows: faster
      trees that differ more from each other (near-duplicate neighbouring rows land in fewer
      trees together).
    proba_floor: the least probability of each direction class, after which rows are
      renormalised. 0.005 is of the order of one in the ~200 training rows a prediction
      averages over (its leaves in the trees): the forest saying "none seen" means "rare", not
      "impossible", and log loss at an exact 0 is infinite.
    return_clip: winsorize each return label at this many robust standard deviations of its
      training labels (None: no clipping). 4 leaves Gaussian-like labels untouched and clips
      only the crash and squeeze days of fat-tailed returns.
    seed: every forest's random_state derives from it (forest i gets seed + i).
    n_jobs: 1: the model step runs beside two sequence-training processes on 2 cores.
    """

    n_estimators: int = 200
    min_samples_leaf: int = 50
    max_features: str | float | int = "sqrt"
    max_samples: float = 0.5
    proba_floor: float = 0.005
    return_clip: float | None = 4.0
    seed: int = 7
    n_jobs: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.n_estimators, int) and self.n_estimators >= 1):
            raise ValueError(f"n_estimators={self.n_estimators!r}: use an integer >= 1, e.g. 200")
        if not (isinstance(self.min_samples_leaf, int) and self.min_samples_leaf >= 1):
            raise ValueError(
                f"min_samples_leaf={self.min_samples_leaf!r}: use an integer >= 1, e.g. 50"
            )
        if not 0.0 < self.max_samples <= 1.0:
            raise ValueError(f"max_samples={self.max_samples}: use a share in (0, 1], e.g. 0.5")
        if not 0.0 < self.proba_floor < 1.0 / len(DIRECTION_COLUMNS):
            raise ValueError(f"proba_floor={self.proba_floor}: use a small positive, e.g. 0.005")
        if self.return_clip is not None and not self.return_clip > 0:
            raise ValueError(f"return_clip={self.return_clip}: use a positive number or None")

    def to_json(self) -> dict:
        return {
            "model": "random_forest",
            "code_version": RANDOM_FOREST_FORECASTER_CODE_VERSION,
            **asdict(self),
        }

    def forest_params(self, offset: int) -> dict:
        return {
            "n_estimators": self.n_estimators,
            "min_samples_leaf": self.min_samples_leaf,
            "max_features": self.max_features,
            "max_samples": self.max_samples,
            "bootstrap": True,
            "n_jobs": self.n_jobs,
            "random_state": self.seed + offset,
        }


@register
class RandomForestForecaster(Forecaster):
    """Every target from the fold's feature columns with random forests (see the module
    docstring). Deterministic for a seed; fitted on training rows only."""

    name = "random_forest"
    targets = ALL_TARGETS

    def __init__(self, cfg: RandomForestForecastConfig = RandomForestForecastConfig()) -> None:
        self.cfg = cfg
        self._forests: dict[str, RandomForestClassifier | RandomForestRegressor] = {}
        self._features: list[str] = []
        self._spec: TargetSpec | None = None
        self._anchor_fill, self._ewma_input = 0.0, False
        self._classes = np.zeros(0, dtype=np.int64)
        self._qrf_leaves = sparse.csr_matrix((0, 0))  # training rows x leaves (1/leaf size)
        self._qrf_y = np.zeros(0)  # the quantile forest's training labels
        self._return_scale = np.zeros(0)
        self._train_rows: dict[str, int] = {}

    def fit(self, data: FoldData) -> RandomForestForecaster:
        """Fit the four forests on `data.train`, each on the rows that have its label (sigma:
        a positive one; returns: every horizon). Validation and test rows are never read.
        Raises ValueError when a target has fewer than 100 training labelled rows."""
        spec = data.targets
        features = list(data.feature_columns)
        train = data.train
        x = _x(train, features)
        return_labels = [spec.return_label(h) for h in spec.return_horizons]
        direction = train[spec.direction].cast(pl.Float64).to_numpy()
        quantile = train[spec.quantile].cast(pl.Float64).to_numpy()
        variance = train[spec.sigma].cast(pl.Float64).to_numpy() ** 2
        returns = train.select(return_labels).cast(pl.Float64).to_numpy()
        keep = {
            DIRECTION: np.isfinite(direction),
            QUANTILES: np.isfinite(quantile),
            # a zero realized volatility is a stale price, not a forecastable state
            SIGMA: np.isfinite(variance) & (variance > 0),
            RETURNS: np.isfinite(returns).all(axis=1),
        }
        names = {
            DIRECTION: repr(spec.direction),
            QUANTILES: repr(spec.quantile),
            SIGMA: repr(spec.sigma),
            RETURNS: ", ".join(map(repr, return_labels)),
        }
        # check every target before fitting any forest: a short fold fails in milliseconds
        for target in ALL_TARGETS:
            n = int(keep[target].sum())
            if n < MIN_TRAIN_ROWS:
                raise ValueError(
                    f"Fold {data.key}: label {names[target]} has {n} labelled training rows "
                    f"(need {MIN_TRAIN_ROWS}); use a longer history or a shorter label horizon"
                )
        anchor = _log_ewma_variance(data)
        a_train = _on_rows(train, anchor)
        fill = float(np.median(a_train)) if a_train.size else 0.0  # training rows only
        cfg = self.cfg
        forests: dict = {}

        k = keep[DIRECTION]
        forests[DIRECTION] = RandomForestClassifier(**cfg.forest_params(0)).fit(
            x[k], direction[k].astype(np.int64)
        )
        self._classes = forests[DIRECTION].classes_.astype(np.int64)

        k = keep[QUANTILES]
        qrf = RandomForestRegressor(**cfg.forest_params(1)).fit(x[k], quantile[k])
        forests[QUANTILES] = qrf
        self._qrf_leaves = training_leaf_weights(qrf, x[k])
        self._qrf_y = quantile[k]

        k = keep[SIGMA]
        xs = np.column_stack([x, a_train]) if anchor is not None else x
        forests[SIGMA] = RandomForestRegressor(**cfg.forest_params(2)).fit(xs[k], variance[k])

        k = keep[RETURNS]
        scale = np.array([_robust_std(train[label], label) for label in return_labels])
        z = returns[k] / scale
        if cfg.return_clip is not None:
            z = np.clip(z, -cfg.return_clip, cfg.return_clip)
        forests[RETURNS] = RandomForestRegressor(**cfg.forest_params(3)).fit(x[k], z)

        self._forests, self._return_scale = forests, scale
        self._features, self._spec = features, spec
        self._anchor_fill, self._ewma_input = fill, anchor is not None
        self._train_rows = {t: int(keep[t].sum()) for t in ALL_TARGETS}
        return self

    def predict(self, data: FoldData) -> pl.DataFrame:
        """`symbol`, `ts` of `data.scored` (same order) plus p_down/p_flat/p_up (summing to 1,
        each > 0), the quantile columns (q10 <= q90), `sigma` (> 0) and ret_<h>."""
        if not self._forests:
            raise RuntimeError("RandomForestForecaster.predict before fit: call fit(data) first")
        if list(data.feature_columns) != self._features or data.targets != self._spec:
            raise ValueError(
                f"Fold {data.key} has other feature columns or targets than the fold this model "
                "was fitted on; fit it on this fold first"
            )
        spec, cfg = self._spec, self.cfg
        rows = data.scored
        x = _x(rows, self._features)
        columns: dict[str, np.ndarray] = {}

        proba = np.zeros((rows.height, len(DIRECTION_COLUMNS)))
        proba[:, self._classes] = self._forests[DIRECTION].predict_proba(x)
        proba = np.clip(proba, cfg.proba_floor, None)
        proba /= proba.sum(axis=1, keepdims=True)
        columns.update(zip(DIRECTION_COLUMNS, proba.T, strict=True))

        levels = sorted(zip(spec.quantile_levels, spec.quantile_columns, strict=True))
        q = forest_quantiles(
            self._forests[QUANTILES], self._qrf_leaves, self._qrf_y, x, [lv for lv, _ in levels]
        )
        columns.update(zip([col for _, col in levels], q.T, strict=True))

        xs = x
        if self._ewma_input:
            ewma = _on_rows(rows, _log_ewma_variance(data), self._anchor_fill)
            xs = np.column_stack([x, ewma])
        columns["sigma"] = np.sqrt(self._forests[SIGMA].predict(xs))

        z = self._forests[RETURNS].predict(x).reshape(rows.height, -1)
        for i, h in enumerate(spec.return_horizons):
            columns[spec.return_column(h)] = z[:, i] * self._return_scale[i]

        ordered = [c for target in ALL_TARGETS for c in spec.prediction_columns(target)]
        return rows.select("symbol", "ts").with_columns(
            [pl.Series(c, columns[c], dtype=pl.Float64) for c in ordered]
        )

    def feature_importance(self) -> dict[str, dict[str, float]]:
        """Per target, each feature's share of the impurity decrease of that target's forest
        (scikit-learn's mean decrease in impurity), largest first. Shares sum to 1 (all 0 when
        no tree split at all)."""
        if not self._forests:
            raise RuntimeError("feature_importance before fit: call fit(data) first")
        out = {}
        for target in ALL_TARGETS:
            shares = np.asarray(self._forests[target].feature_importances_, dtype=np.float64)
            names = self._features + ([EWMA_INPUT] if len(shares) > len(self._features) else [])
            out[target] = dict(
                sorted(zip(names, map(float, shares), strict=True), key=lambda kv: -kv[1])
            )
        return out

    def fit_info(self) -> dict:
        """Per target: the training rows its forest was fitted on and its mean leaves per tree
        (`fit_registered` records this beside the fit seconds)."""
        if not self._forests:
            return {}
        return {
            "train_rows": dict(self._train_rows),
            "mean_leaves": {
                t: round(float(np.mean([e.get_n_leaves() for e in f.estimators_])), 1)
                for t, f in self._forests.items()
            },
        }


def _leaf_ids(forest: RandomForestRegressor, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Each row's leaf in every tree as one column index over all trees' nodes (tree t's
    node j is offset_t + j), and the number of such columns."""
    nodes = np.array([e.tree_.node_count for e in forest.estimators_])
    offsets = np.concatenate([[0], np.cumsum(nodes)[:-1]])
    return forest.apply(x) + offsets, int(nodes.sum())


def training_leaf_weights(forest: RandomForestRegressor, x_train: np.ndarray) -> sparse.csr_matrix:
    """training rows x (tree, node): 1 / |leaf_t(row)| where the row falls, else 0; the
    leaf size counts every training row in that leaf (not only the tree's bootstrap sample)."""
    ids, n_cols = _leaf_ids(forest, x_train)
    n, t = ids.shape
    member = sparse.csr_matrix(
        (np.ones(n * t), (np.repeat(np.arange(n), t), ids.ravel())), shape=(n, n_cols)
    )
    size = np.asarray(member.sum(axis=0)).ravel()
    inverse = np.divide(1.0, size, out=np.zeros_like(size), where=size > 0)
    return (member @ sparse.diags(inverse)).tocsr()


def forest_quantiles(
    forest: RandomForestRegressor,
    train_leaves: sparse.csr_matrix,
    y_train: np.ndarray,
    x: np.ndarray,
    levels: list[float],
) -> np.ndarray:
    """rows x levels: the quantile regression forest's inf {y : F(y | x) >= level}, F the
    weighted empirical distribution of `y_train` with Meinshausen's weights w_i(x) = mean over
    trees of 1{i in leaf_t(x)} / |leaf_t(x)| (`train_leaves` from `training_leaf_weights`)."""
    ids, n_cols = _leaf_ids(forest, x)
    m, t = ids.shape
    order = np.argsort(y_train, kind="stable")
    y_sorted = y_train[order]
    leaves_t = train_leaves[order].T.tocsr()  # (tree, node) x training rows in label order
    out = np.empty((m, len(levels)))
    for start in range(0, m, _QRF_CHUNK):
        block = ids[start : start + _QRF_CHUNK]
        b = block.shape[0]
        pick = sparse.csr_matrix(
            (np.full(b * t, 1.0 / t), (np.repeat(np.arange(b), t), block.ravel())),
            shape=(b, n_cols),
        )
        cdf = np.cumsum((pick @ leaves_t).toarray(), axis=1)  # each row ends at 1
        for j, level in enumerate(levels):
            # first label where the distribution function reaches the level (a float
            # tolerance so a level hit exactly, e.g. 0.5 of two rows, is not missed)
            first = np.argmax(cdf >= level - 1e-12, axis=1)
            out[start : start + b, j] = y_sorted[first]
    return out
