"""Ensembles of forecasters: per target, a convex combination of the members that predict it,
with weights chosen on a fold's VALIDATION rows only (or equal weights, reported beside it).

Each weight vector ("group") is fitted to the validation loss of the combination:

| group      | combination                          | loss minimized                     |
|------------|--------------------------------------|------------------------------------|
| direction  | linear opinion pool of p_down/flat/up | log loss                           |
| quantiles  | weighted average of each quantile     | sum of the pinball losses (one vector for all levels) |
| sigma      | sqrt of the weighted average variance | QLIKE of the variance              |
| ret_<h>    | weighted average of ret_<h>           | MSE                                |

Returns get one weight vector per horizon: members differ most by horizon (a model with a real
one-bar edge can be noise at thirty bars), and one shared vector would let the long horizons'
larger errors decide the short ones' weights.

Weights are non-negative and sum to 1. The pinball problem is a linear programme and is solved
exactly (HiGHS); the smooth ones with SLSQP on the simplex. The weights kept are whichever of
the solver's, the equal weights and each single member has the lowest validation loss, so the
fitted combination is never worse on validation than the best member or the simple average.
Rows with a null or non-finite label, or prediction of any member taking part, are skipped for
that group. A non-negative average keeps each member's quantile order, so q10 <= q90 holds for
the combination when it holds for every member.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import optimize, sparse

from ml.forecasters.base import DIRECTION, DIRECTION_COLUMNS, QUANTILES, SIGMA, TargetSpec

ENSEMBLE_CODE_VERSION = "1"
OPTIMIZED, EQUAL = "optimized", "equal"
KEYS = ["symbol", "ts"]
EPS = 1e-12


class NoValidationRowsError(ValueError):
    """No validation row has a label and every member's prediction for some group."""


@dataclass(frozen=True)
class EnsembleWeights:
    """`weights[group][member]`: the weight of each member taking part in a group (a target, or
    `ret_<h>` per return horizon); `columns[group]`: the prediction columns the group combines.
    Groups no member covers are absent."""

    method: str
    weights: dict[str, dict[str, float]]
    columns: dict[str, tuple[str, ...]]

    def to_json(self) -> dict:
        return {
            "code_version": ENSEMBLE_CODE_VERSION,
            "method": self.method,
            "weights": self.weights,
            "columns": {g: list(c) for g, c in self.columns.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> EnsembleWeights:
        return cls(
            d["method"],
            {g: dict(w) for g, w in d["weights"].items()},
            {g: tuple(c) for g, c in d["columns"].items()},
        )


def fit_ensemble(
    val_predictions: dict[str, pl.DataFrame], val_labels: pl.DataFrame, targets: TargetSpec
) -> EnsembleWeights:
    """Weights per group minimizing the validation loss of the combination (see the module
    docstring). `val_predictions`: member name -> `symbol`, `ts` and its prediction columns;
    it may hold any rows (all scored rows, say): only those of `val_labels` are used.
    `val_labels`: the validation rows (`FoldData.val`): `symbol`, `ts` and the label columns."""
    _check_unique_keys("val_labels", val_labels)
    for name, frame in val_predictions.items():
        _check_unique_keys(f"member {name!r}", frame)
    weights, columns = {}, {}
    for group, cols, label in _groups(targets):
        members = _covering(val_predictions, group, cols)
        if not members:
            continue
        if label not in val_labels.columns:
            raise ValueError(
                f"val_labels lacks {label!r}, the label of {group!r} that members {members} "
                "predict; pass the fold's validation rows with their label columns"
            )
        y, stack = _validation_arrays(val_predictions, val_labels, members, cols, label)
        if y.size == 0:
            raise NoValidationRowsError(
                f"No validation row has a finite {label!r} and a prediction of every member "
                f"{members} for {group!r}; check the members predict the validation rows"
            )
        w = _best_weights(group, y, stack, targets)
        weights[group] = dict(zip(members, map(float, w), strict=True))
        columns[group] = cols
    return EnsembleWeights(OPTIMIZED, weights, columns)


def equal_weights(predictions: dict[str, pl.DataFrame], targets: TargetSpec) -> EnsembleWeights:
    """The simple average: every member covering a group gets the same weight."""
    weights, columns = {}, {}
    for group, cols, _ in _groups(targets):
        members = _covering(predictions, group, cols)
        if members:
            weights[group] = {m: 1.0 / len(members) for m in members}
            columns[group] = cols
    return EnsembleWeights(EQUAL, weights, columns)


def combine(predictions: dict[str, pl.DataFrame], weights: EnsembleWeights) -> pl.DataFrame:
    """`symbol`, `ts` (the rows and order of the first member with a positive weight) and each
    weighted group's columns, combined as the module docstring says. Every member with a
    positive weight must predict exactly the same rows; where one holds a null prediction, the
    combination is null on that row."""
    used = list(dict.fromkeys(m for w in weights.weights.values() for m, x in w.items() if x > 0))
    missing = [m for m in used if m not in predictions]
    if missing:
        raise ValueError(
            f"The weights use members {missing} that are not in predictions "
            f"({sorted(predictions)}); pass every member's prediction frame"
        )
    if not used:
        raise ValueError("The weights give no member a positive weight: nothing to combine")
    keys = predictions[used[0]].select(KEYS)
    wide = keys
    for i, name in enumerate(used):
        frame = predictions[name]
        _check_unique_keys(f"member {name!r}", frame)
        if frame.height != keys.height or keys.join(frame, on=KEYS, how="anti").height:
            raise ValueError(
                f"Member {name!r} predicts other rows than {used[0]!r}; combine the members "
                "on the same fold rows"
            )
        cols = [
            c for g, w in weights.weights.items() if w.get(name, 0) > 0 for c in weights.columns[g]
        ]
        wide = wide.join(
            frame.select(*KEYS, *[pl.col(c).alias(_tag(i, c)) for c in dict.fromkeys(cols)]),
            on=KEYS,
            how="left",
            maintain_order="left",
        )
    out = []
    for group, w in weights.weights.items():
        parts = [(used.index(m), x) for m, x in w.items() if x > 0]
        for c in weights.columns[group]:
            if group == SIGMA:
                # volatilities are averaged as variances, the scale QLIKE scores them on
                pooled = pl.sum_horizontal([x * pl.col(_tag(i, c)) ** 2 for i, x in parts]).sqrt()
            else:
                pooled = pl.sum_horizontal([x * pl.col(_tag(i, c)) for i, x in parts])
            # sum_horizontal skips nulls; a member without a forecast must null the combination
            has_all = pl.all_horizontal([pl.col(_tag(i, c)).is_not_null() for i, _ in parts])
            out.append(pl.when(has_all).then(pooled).otherwise(None).alias(c))
    return wide.select(*KEYS, *out)


def _groups(targets: TargetSpec) -> list[tuple[str, tuple[str, ...], str]]:
    """(group, prediction columns, label column) of every weight vector an ensemble can fit."""
    groups = [
        (DIRECTION, DIRECTION_COLUMNS, targets.direction),
        (QUANTILES, targets.quantile_columns, targets.quantile),
        (SIGMA, ("sigma",), targets.sigma),
    ]
    for h in targets.return_horizons:
        col = targets.return_column(h)
        groups.append((col, (col,), targets.return_label(h)))
    return groups


def _covering(predictions: dict[str, pl.DataFrame], group: str, cols: tuple[str, ...]) -> list:
    members = []
    for name, frame in predictions.items():
        present = [c for c in cols if c in frame.columns]
        if present and len(present) < len(cols):
            raise ValueError(
                f"Member {name!r} has {present} but not all of {list(cols)} for {group!r}; "
                "a member predicts all of a target's columns or none"
            )
        if present:
            members.append(name)
    return members


def _check_unique_keys(what: str, frame: pl.DataFrame) -> None:
    missing = [k for k in KEYS if k not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks {missing}; every frame is keyed by symbol and ts")
    if frame.select(pl.struct(KEYS).is_duplicated().any()).item():
        raise ValueError(f"{what} has duplicate (symbol, ts) rows; pass one row per key")


def _tag(i: int, col: str) -> str:
    # member names are free text; positions make safe, distinct column names
    return f"m{i}\x1f{col}"


def _validation_arrays(
    predictions: dict[str, pl.DataFrame],
    labels: pl.DataFrame,
    members: list[str],
    cols: tuple[str, ...],
    label: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The label (n,) and predictions (n, columns, members) of the validation rows where all
    of them are finite."""
    wide = labels.select(*KEYS, pl.col(label).cast(pl.Float64))
    for i, name in enumerate(members):
        wide = wide.join(
            predictions[name].select(*KEYS, *[pl.col(c).alias(_tag(i, c)) for c in cols]),
            on=KEYS,
            how="left",
        )
    y = wide[label].to_numpy()
    stack = np.stack(
        [
            wide.select([_tag(i, c) for c in cols]).to_numpy().astype(np.float64)
            for i in range(len(members))
        ],
        axis=-1,
    )
    keep = np.isfinite(y) & np.isfinite(stack).all(axis=(1, 2))
    return y[keep], stack[keep]


Loss = Callable[[np.ndarray], float]
Gradient = Callable[[np.ndarray], np.ndarray]


def _objective(
    group: str, y: np.ndarray, stack: np.ndarray, targets: TargetSpec
) -> tuple[Loss, Gradient | None]:
    """The validation loss of the combination as a function of the weights (up to a positive
    factor), and its gradient where it is smooth (None for the piecewise-linear pinball)."""
    if group == DIRECTION:
        if not np.isin(y, np.arange(len(DIRECTION_COLUMNS))).all():
            raise ValueError(
                f"Direction labels {sorted(set(y) - {0.0, 1.0, 2.0})[:5]} are not classes "
                "0/1/2 (down/flat/up); pass the label column from ml.labels"
            )
        # only the probability each member gave the realized class enters the log loss
        realized = stack[np.arange(len(y)), y.astype(np.int64), :]
        return (
            lambda w: float(-np.mean(np.log(np.maximum(realized @ w, EPS)))),
            lambda w: -np.mean(realized / np.maximum(realized @ w, EPS)[:, None], axis=0),
        )
    if group == QUANTILES:
        levels = np.asarray(targets.quantile_levels)[None, :]

        def pinball(w: np.ndarray) -> float:
            d = y[:, None] - stack @ w
            return float(np.mean(np.sum(np.maximum(levels * d, (levels - 1) * d), axis=1)))

        return pinball, None
    if group == SIGMA:
        realized, variance = y**2, stack[:, 0, :] ** 2

        def qlike(w: np.ndarray) -> float:
            v = np.maximum(variance @ w, EPS)
            return float(np.mean(realized / v + np.log(v)))

        def qlike_gradient(w: np.ndarray) -> np.ndarray:
            v = np.maximum(variance @ w, EPS)
            return np.mean((1 / v - realized / v**2)[:, None] * variance, axis=0)

        return qlike, qlike_gradient
    # MSE relative to the zero forecast: returns are ~1e-2, and an O(1) objective keeps the
    # solver's absolute tolerances meaningful
    scale = max(float(np.mean(y**2)), EPS)
    r = stack[:, 0, :]
    return (
        lambda w: float(np.mean((y - r @ w) ** 2) / scale),
        lambda w: -2 * np.mean((y - r @ w)[:, None] * r, axis=0) / scale,
    )


def _best_weights(group: str, y: np.ndarray, stack: np.ndarray, targets: TargetSpec) -> np.ndarray:
    m = stack.shape[2]
    equal = np.full(m, 1.0 / m)
    if m == 1:
        return equal
    loss, grad = _objective(group, y, stack, targets)
    solved = (
        _pinball_lp(y, stack, targets.quantile_levels)
        if grad is None
        else _simplex_slsqp(loss, grad, m)
    )
    candidates = [c for c in (solved,) if c is not None] + [equal, *np.eye(m)]
    return min(candidates, key=loss)


def _simplex_slsqp(loss: Loss, grad: Gradient, m: int) -> np.ndarray:
    result = optimize.minimize(
        loss,
        np.full(m, 1.0 / m),
        jac=grad,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * m,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(m)}],
        options={"ftol": 1e-10, "maxiter": 500},
    )
    return _to_simplex(result.x)


def _pinball_lp(y: np.ndarray, stack: np.ndarray, levels: tuple[float, ...]) -> np.ndarray | None:
    """Exact minimizer of the summed pinball loss over the simplex: with over- and
    under-shoots u, v >= 0 per (row, level), minimize sum(tau u + (1 - tau) v) subject to
    Q w + u - v = y and sum(w) = 1. None if the solver fails (the caller has fallbacks)."""
    n, k, m = stack.shape
    q = stack.transpose(1, 0, 2).reshape(k * n, m)  # level-major rows
    eye = sparse.identity(k * n, format="csr")
    a_eq = sparse.vstack(
        [
            sparse.hstack([sparse.csr_matrix(q), eye, -eye]),
            sparse.hstack([sparse.csr_matrix(np.ones((1, m))), sparse.csr_matrix((1, 2 * k * n))]),
        ],
        format="csr",
    )
    b_eq = np.concatenate([np.tile(y, k), [1.0]])
    tau = np.repeat(np.asarray(levels, dtype=np.float64), n)
    c = np.concatenate([np.zeros(m), tau, 1.0 - tau]) / n
    result = optimize.linprog(c, A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    return _to_simplex(result.x[:m]) if result.success else None


def _to_simplex(w: np.ndarray) -> np.ndarray:
    # solvers land within rounding of the simplex; clip the -1e-17s and renormalize
    w = np.clip(np.asarray(w, dtype=np.float64), 0.0, None)
    return w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))
