"""Ensemble weights: on the simplex, chosen on validation rows only, and drawn to the member
that generated the truth; the combination rules of each target."""

import json
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
from scipy.stats import norm

from ml.forecasters import TargetSpec
from ml.forecasters.ensemble import EnsembleWeights, combine, equal_weights, fit_ensemble

SPEC = TargetSpec()
N_VAL, N_TEST = 1500, 400
GROUPS = {"direction", "quantiles", "sigma", *[f"ret_{h}" for h in SPEC.return_horizons]}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _forecast(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """One draw of every target's forecast: the truth is then drawn from the "good" one."""
    mu, s = rng.normal(0, 0.1, n), 0.05 * np.exp(0.5 * rng.normal(size=n))
    p = _softmax(rng.normal(0, 1.5, (n, 3)))
    out = {"p_down": p[:, 0], "p_flat": p[:, 1], "p_up": p[:, 2]}
    out |= {"q10": mu + s * norm.ppf(0.1), "q90": mu + s * norm.ppf(0.9), "_mu": mu, "_s": s}
    out["sigma"] = 0.02 * np.exp(0.5 * rng.normal(size=n))
    for h in SPEC.return_horizons:
        out[f"ret_{h}"] = rng.normal(0, 0.02 * np.sqrt(h), n)
    return out


@pytest.fixture(scope="module")
def case() -> dict:
    """Members "good" (the truth-generating forecast) and "noise" (an independent draw of the
    same kind) over validation then test rows, and the validation rows' labels."""
    rng = np.random.default_rng(0)
    n = N_VAL + N_TEST
    keys = {"symbol": ["A"] * n, "ts": [datetime(2020, 1, 1) + timedelta(days=i) for i in range(n)]}
    good, noise = _forecast(rng, n), _forecast(rng, n)
    p = np.column_stack([good["p_down"], good["p_flat"], good["p_up"]])
    labels = {
        SPEC.direction: (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1),
        SPEC.quantile: good["_mu"] + good["_s"] * rng.normal(size=n),
        SPEC.sigma: (good["sigma"][:, None] * rng.normal(size=(n, 30))).std(axis=1, ddof=1),
        **{
            SPEC.return_label(h): good[f"ret_{h}"] + rng.normal(0, 0.02 * np.sqrt(h), n)
            for h in SPEC.return_horizons
        },
    }

    def frame(d: dict) -> pl.DataFrame:
        return pl.DataFrame(keys | {k: v for k, v in d.items() if not k.startswith("_")})

    members = {"good": frame(good), "noise": frame(noise)}
    val_labels = pl.DataFrame(keys | labels).head(N_VAL)
    return {"members": members, "val_labels": val_labels}


@pytest.fixture(scope="module")
def fitted(case) -> EnsembleWeights:
    return fit_ensemble(case["members"], case["val_labels"], SPEC)


def test_weights_are_non_negative_and_sum_to_one_per_target(case, fitted):
    good, noise = case["members"]["good"], case["members"]["noise"]
    third = good.select("symbol", "ts", *[(good[c] + noise[c]) / 2 for c in good.columns[2:]])
    weights = fit_ensemble(case["members"] | {"blend": third}, case["val_labels"], SPEC)
    for w in (fitted, weights):
        assert set(w.weights) == GROUPS
        for group in w.weights.values():
            assert all(x >= 0 for x in group.values())
            assert sum(group.values()) == pytest.approx(1.0, abs=1e-12)
    assert set(weights.weights["direction"]) == {"good", "noise", "blend"}


def test_weight_concentrates_on_the_truth_generating_member(fitted):
    for group, w in fitted.weights.items():
        assert w["good"] > 0.8, (group, w)


def test_equal_weights_combine_to_the_hand_computed_average(case):
    good, noise = case["members"]["good"], case["members"]["noise"]
    weights = equal_weights(case["members"], SPEC)
    assert weights.method == "equal"
    assert all(w == {"good": 0.5, "noise": 0.5} for w in weights.weights.values())
    out = combine(case["members"], weights)
    assert out.select("symbol", "ts").equals(good.select("symbol", "ts"))
    for c in ["p_down", "p_flat", "p_up", "q10", "q90", *[f"ret_{h}" for h in (1, 5, 10, 30)]]:
        np.testing.assert_allclose(out[c], (good[c].to_numpy() + noise[c].to_numpy()) / 2)
    variance = (good["sigma"].to_numpy() ** 2 + noise["sigma"].to_numpy() ** 2) / 2
    np.testing.assert_allclose(out["sigma"], np.sqrt(variance))
    np.testing.assert_allclose(out.select("p_down", "p_flat", "p_up").sum_horizontal(), 1.0)


def test_weights_depend_on_validation_rows_only(case, fitted):
    is_test = pl.int_range(pl.len()) >= N_VAL
    shifted = {
        name: frame.with_columns(
            pl.when(is_test)
            .then(pl.exclude("symbol", "ts") * 1.7)
            .otherwise(pl.exclude("symbol", "ts"))
        )
        for name, frame in case["members"].items()
    }
    again = fit_ensemble(shifted, case["val_labels"], SPEC)
    assert again.weights == fitted.weights
    before, after = combine(case["members"], fitted), combine(shifted, again)
    assert after.head(N_VAL).equals(before.head(N_VAL))
    changed = (
        after.tail(N_TEST).drop("symbol", "ts").to_numpy()
        != before.tail(N_TEST).drop("symbol", "ts").to_numpy()
    )
    assert changed.all()


def test_rows_with_a_null_label_are_skipped_for_that_target_only(case, fitted):
    nulled = pl.int_range(pl.len()) < 300
    labels = case["val_labels"].with_columns(
        pl.when(nulled).then(None).otherwise(pl.col(SPEC.sigma)).alias(SPEC.sigma)
    )
    weights = fit_ensemble(case["members"], labels, SPEC)
    assert {g: w for g, w in weights.weights.items() if g != "sigma"} == {
        g: w for g, w in fitted.weights.items() if g != "sigma"
    }
    dropped = fit_ensemble(case["members"], case["val_labels"].slice(300), SPEC)
    assert weights.weights["sigma"] == dropped.weights["sigma"]
    assert weights.weights["sigma"] != fitted.weights["sigma"]


def test_fitted_weights_never_lose_to_equal_weights_or_a_single_member_on_validation(case, fitted):
    val = case["val_labels"]
    y = val["fwd_ret_30"].to_numpy()

    def mse(weights: EnsembleWeights) -> float:
        pred = combine(case["members"], weights)["ret_30"].head(N_VAL).to_numpy()
        return float(np.mean((pred - y) ** 2))

    singles = [
        EnsembleWeights("single", {"ret_30": {m: 1.0}}, {"ret_30": ("ret_30",)})
        for m in case["members"]
    ]
    best = mse(fitted)
    assert all(best <= mse(w) + 1e-15 for w in [equal_weights(case["members"], SPEC), *singles])


def test_a_target_no_member_covers_is_absent(case):
    partial = {
        name: frame.select("symbol", "ts", "p_down", "p_flat", "p_up", "sigma")
        for name, frame in case["members"].items()
    }
    weights = fit_ensemble(partial, case["val_labels"], SPEC)
    assert set(weights.weights) == {"direction", "sigma"}
    assert set(equal_weights(partial, SPEC).weights) == {"direction", "sigma"}
    assert combine(partial, weights).columns == [
        "symbol",
        "ts",
        "p_down",
        "p_flat",
        "p_up",
        "sigma",
    ]


def test_only_members_covering_a_target_take_part_in_it(case):
    members = case["members"] | {
        "vol_only": case["members"]["good"].select("symbol", "ts", "sigma")
    }
    weights = fit_ensemble(members, case["val_labels"], SPEC)
    assert "vol_only" in weights.weights["sigma"]
    assert all("vol_only" not in w for g, w in weights.weights.items() if g != "sigma")


def test_weights_round_trip_through_json(fitted):
    again = EnsembleWeights.from_json(json.loads(json.dumps(fitted.to_json())))
    assert again == fitted


def test_a_member_missing_from_the_predictions_is_named(case, fitted):
    with pytest.raises(ValueError, match="'noise'"):
        combine({"good": case["members"]["good"]}, fitted)


def test_a_member_with_part_of_a_targets_columns_is_rejected(case):
    broken = case["members"] | {"half": case["members"]["good"].select("symbol", "ts", "q10")}
    with pytest.raises(ValueError, match="'half'.*quantiles"):
        fit_ensemble(broken, case["val_labels"], SPEC)


def test_a_null_member_prediction_nulls_the_combination_on_that_row(case):
    members = dict(case["members"])
    members["noise"] = members["noise"].with_columns(
        pl.when(pl.int_range(pl.len()) == 5).then(None).otherwise(pl.col("ret_1")).alias("ret_1")
    )
    out = combine(members, equal_weights(members, SPEC))
    assert out["ret_1"].null_count() == 1 and out["ret_1"][5] is None
    assert out["ret_5"].null_count() == 0
