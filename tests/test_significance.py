"""ml.significance: Diebold-Mariano, Model Confidence Set, group-aware block bootstrap and the
non-overlapping subsample, against hand-computed answers and constructed cases."""

import math
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
from scipy import stats

from ml.significance import (
    block_bootstrap_ci,
    compare,
    diebold_mariano,
    model_confidence_set,
    non_overlapping,
    non_overlapping_mask,
)

# loss differential used by the hand-computed DM tests: mean 4.5 / 5 = 0.9, deviations
# .1, -2.9, 2.1, -.4, 1.1, variance (ddof 0) (.01 + 8.41 + 4.41 + .16 + 1.21) / 5 = 2.84
D = np.array([1.0, -2.0, 3.0, 0.5, 2.0])
DM_LAGS0 = 0.9 / math.sqrt(2.84 / 5)  # 1.194176


def test_diebold_mariano_lag0_matches_hand_computation_with_harvey_factor():
    base = np.array([2.0, 5.0, 1.0, 3.0, 4.0])
    res = diebold_mariano(base + D, base, horizon=1, lags=0)
    # Harvey factor for n=5, h=1: sqrt((5 + 1 - 2 + 0) / 5) = sqrt(0.8)
    stat = DM_LAGS0 * math.sqrt(0.8)
    assert res["stat"] == pytest.approx(stat)  # 1.068103
    assert res["p_value"] == pytest.approx(2 * stats.t.cdf(-stat, df=4))
    assert res["mean_diff"] == pytest.approx(0.9)
    assert res["lags"] == 0 and res["n"] == 5
    # h = 2: sqrt((5 + 1 - 4 + 2 * 1 / 5) / 5) = sqrt(0.48)
    res2 = diebold_mariano(base + D, base, horizon=2, lags=0)
    assert res2["stat"] == pytest.approx(DM_LAGS0 * math.sqrt(0.48))


def test_diebold_mariano_hac_lag1_matches_hand_computation():
    # autocovariance 1: (.1*-2.9 + -2.9*2.1 + 2.1*-.4 + -.4*1.1) / 5 = -7.66 / 5 = -1.532
    # Bartlett weight 1/2: long-run variance 2.84 + 2 * .5 * -1.532 = 1.308
    res = diebold_mariano(D, np.zeros(5), horizon=2, lags=1)
    assert res["stat"] == pytest.approx(0.9 / math.sqrt(1.308 / 5) * math.sqrt(0.48))
    assert res["lags"] == 1


def test_diebold_mariano_default_lags_cover_the_horizon():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=1000), rng.normal(size=1000)
    assert diebold_mariano(a, b, horizon=30)["lags"] == 58  # 2 (horizon - 1) > ceil(1000^(1/3))
    assert diebold_mariano(a, b, horizon=1)["lags"] == 10  # ceil(1000 ** (1/3)) = 10


def test_diebold_mariano_averages_a_panel_per_timestamp_in_time_order():
    # two symbols whose differentials are D + c and D - c: the per-timestamp mean is D
    c = np.array([0.3, -1.0, 2.0, 0.7, -0.2])
    ts = np.r_[np.arange(5), np.arange(5)]
    diff = np.r_[D + c, D - c]
    shuffle = np.random.default_rng(1).permutation(10)
    res = diebold_mariano(diff[shuffle], np.zeros(10), horizon=1, ts=ts[shuffle], lags=0)
    assert res["n"] == 5
    assert res["stat"] == pytest.approx(DM_LAGS0 * math.sqrt(0.8))
    # with lag 1 the order matters: the series must be D in time order
    res1 = diebold_mariano(diff[shuffle], np.zeros(10), horizon=2, ts=ts[shuffle], lags=1)
    assert res1["stat"] == pytest.approx(0.9 / math.sqrt(1.308 / 5) * math.sqrt(0.48))


def _overlapping_noise(rng: np.random.Generator, n: int, h: int) -> np.ndarray:
    """Sums of h consecutive iid normals: the MA(h-1) dependence of h-bar labels."""
    return np.convolve(rng.normal(size=n + h - 1), np.ones(h), "valid")


def test_diebold_mariano_keeps_its_size_under_overlapping_labels():
    h, n, trials = 10, 400, 150
    hac, naive = [], []
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        d, base = _overlapping_noise(rng, n, h), rng.gamma(2.0, 1.0, n)
        hac.append(diebold_mariano(base + d, base, h)["p_value"] < 0.05)
        naive.append(diebold_mariano(base + d, base, h, lags=0)["p_value"] < 0.05)
    # equal expected loss: the HAC test rejects near its 5% level (Bartlett weights make it a
    # little liberal), ignoring the overlap rejects about half the time
    assert np.mean(hac) < 0.15
    assert np.mean(naive) > 0.35


def test_diebold_mariano_on_equal_losses_is_not_significant():
    rng = np.random.default_rng(7)
    base = rng.gamma(2.0, 1.0, 500)
    noise = rng.normal(0.0, 0.5, 500)
    res = diebold_mariano(base + noise, base + noise[::-1], horizon=5)  # same distribution
    assert res["p_value"] > 0.1


def test_diebold_mariano_detects_a_clearly_better_forecast():
    rng = np.random.default_rng(2)
    base = rng.gamma(2.0, 1.0, 500)
    noise = _overlapping_noise(rng, 500, 5) / 5
    noise -= noise.mean()  # so the loss gap is exactly 0.3
    res = diebold_mariano(base, base + 0.3 + noise, horizon=5)
    assert res["p_value"] < 0.01
    assert res["stat"] < 0 and res["mean_diff"] == pytest.approx(-0.3)


def test_diebold_mariano_on_constant_differentials():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    same = diebold_mariano(a, a.copy(), horizon=1)
    assert same["stat"] == 0.0 and same["p_value"] == 1.0
    shifted = diebold_mariano(a, a + 1.0, horizon=1)
    assert shifted["stat"] == -math.inf and shifted["p_value"] == 0.0


def test_diebold_mariano_rejects_bad_inputs():
    with pytest.raises(ValueError, match="too few for horizon 5"):
        diebold_mariano(np.zeros(5), np.ones(5), horizon=5)
    with pytest.raises(ValueError, match="same rows"):
        diebold_mariano(np.zeros(5), np.ones(6), horizon=1)
    with pytest.raises(ValueError, match="loss_b has 1 NaN"):
        diebold_mariano(np.zeros(3), np.array([0.0, np.nan, 1.0]), horizon=1)
    with pytest.raises(ValueError, match="ts must have one timestamp per row"):
        diebold_mariano(np.zeros(3), np.ones(3), horizon=1, ts=np.arange(4))


def _panel_losses(seed: int, n: int = 400) -> tuple[np.random.Generator, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng, rng.gamma(2.0, 1.0, n)  # the shared part every forecaster's loss has


def test_mcs_with_one_clearly_best_model_contains_only_it():
    rng, base = _panel_losses(0)
    losses = {
        "best": base + rng.normal(0, 0.3, base.size),
        "worse": base + 0.5 + rng.normal(0, 0.3, base.size),
        "worst": base + 1.0 + rng.normal(0, 0.3, base.size),
    }
    res = model_confidence_set(losses, block=5, reps=300)
    assert res["included"] == ["best"]
    assert res["pvalues"]["best"] == 1.0 and res["pvalues"]["worst"] < 0.1
    assert res["method"] == "R" and res["block"] == 5


def test_mcs_keeps_two_statistically_identical_models():
    rng, base = _panel_losses(1)
    losses = {
        "a": base + rng.normal(0, 0.3, base.size),
        "bad": base + 1.0 + rng.normal(0, 0.3, base.size),
        "b": base + rng.normal(0, 0.3, base.size),
    }
    res = model_confidence_set(losses, block=5, reps=300)
    assert res["included"] == ["a", "b"]


def test_mcs_handles_identical_and_constant_losses():
    rng, base = _panel_losses(2)
    twins = model_confidence_set(
        {"a": base, "a_copy": base.copy(), "bad": base + 1.0 + rng.normal(0, 0.3, base.size)},
        block=5,
        reps=200,
    )
    assert twins["included"] == ["a", "a_copy"]
    assert twins["pvalues"]["a"] == twins["pvalues"]["a_copy"]
    all_same = model_confidence_set({"x": np.ones(50), "y": np.ones(50)}, block=5, reps=50)
    assert all_same["included"] == ["x", "y"] and all_same["pvalues"] == {"x": 1.0, "y": 1.0}
    constant = model_confidence_set({"low": np.ones(50), "high": np.full(50, 2.0)}, block=5)
    assert constant["included"] == ["low"] and constant["pvalues"]["high"] == 0.0


def test_mcs_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least two forecasters"):
        model_confidence_set({"a": np.ones(5)}, block=1)
    with pytest.raises(ValueError, match="same rows"):
        model_confidence_set({"a": np.ones(5), "b": np.ones(6)}, block=1)
    with pytest.raises(ValueError, match=r"block must be an integer in 1\.\.5"):
        model_confidence_set({"a": np.ones(5), "b": np.zeros(5)}, block=6)


def test_block_bootstrap_interval_covers_the_mean_and_widens_with_dependence():
    rng = np.random.default_rng(1)
    iid = rng.normal(0.3, 1.0, 2000)
    lo, hi = block_bootstrap_ci(iid, block=1)
    assert lo < 0.3 < hi
    walk = np.repeat(rng.normal(0, 1, 40), 50)  # strongly dependent: 40 distinct blocks
    narrow = np.subtract(*block_bootstrap_ci(walk, block=1)[::-1])
    wide = np.subtract(*block_bootstrap_ci(walk, block=50)[::-1])
    assert wide > 3 * narrow


def test_block_bootstrap_resamples_only_possible_block_means():
    # x = 0 1 2 3, block 2: block sums 1 (start 0), 3, 5; two blocks -> mean in .5 .. 2.5,
    # each extreme with probability 1/9, so a 99% interval hits both ends exactly
    assert block_bootstrap_ci(np.arange(4.0), 2, n_boot=20000, level=0.99) == (0.5, 2.5)
    # x = 0..4, block 2: two full blocks (sums 1, 3, 5, 7) and one cut to its first row
    # (0..3): extremes (1 + 1 + 0) / 5 = .4 and (7 + 7 + 3) / 5 = 3.4
    assert block_bootstrap_ci(np.arange(5.0), 2, n_boot=20000, level=0.999) == (0.4, 3.4)


def test_block_bootstrap_never_builds_a_block_across_groups():
    # group A: 7 zeros, group B: 13 ones, interleaved. Within-group resampling always rebuilds
    # 7 zeros and 13 ones, so every bootstrap mean is exactly 13 / 20; a block straddling the
    # two groups would mix them and move the mean.
    values = np.r_[np.zeros(7), np.ones(13)]
    groups = np.array(["A"] * 7 + ["B"] * 13)
    order = np.random.default_rng(0).permutation(20)
    assert block_bootstrap_ci(values[order], 5, groups=groups[order]) == (0.65, 0.65)
    # the same rows as one series do straddle and the interval opens up
    lo, hi = block_bootstrap_ci(values, 5)
    assert lo < 0.65 < hi


def test_block_bootstrap_clips_the_block_to_a_short_group():
    # group A (0, 1, 2) is shorter than the block: its only block is the whole group
    values = np.r_[0.0, 1.0, 2.0, np.full(4, 5.0)]
    groups = np.array([1, 1, 1, 2, 2, 2, 2])
    mean = (0 + 1 + 2 + 20) / 7
    lo, hi = block_bootstrap_ci(values, 10, groups=groups)
    assert lo == pytest.approx(mean) and hi == pytest.approx(mean)


def test_block_bootstrap_rejects_bad_inputs():
    with pytest.raises(ValueError, match="groups must have one label per row"):
        block_bootstrap_ci(np.zeros(4), 2, groups=np.zeros(3))
    with pytest.raises(ValueError, match="block must be a positive"):
        block_bootstrap_ci(np.zeros(4), 0)
    with pytest.raises(ValueError, match="diff has 1 NaN"):
        block_bootstrap_ci(np.array([0.0, np.nan]), 1)


def _panel(lengths: dict[str, int]) -> pl.DataFrame:
    start = datetime(2024, 1, 1)
    frame = pl.DataFrame(
        {
            "symbol": [s for s, n in lengths.items() for _ in range(n)],
            "ts": [start + timedelta(days=i) for n in lengths.values() for i in range(n)],
        }
    )
    return frame.with_row_index("row").sample(fraction=1.0, shuffle=True, seed=3)


def test_non_overlapping_keeps_rows_exactly_horizon_apart_per_symbol():
    frame = _panel({"BTC": 10, "ETH": 7})
    kept = non_overlapping(frame, 3)
    days = {
        s: sorted((t - datetime(2024, 1, 1)).days for t in kept.filter(pl.col("symbol") == s)["ts"])
        for s in ("BTC", "ETH")
    }
    assert days == {"BTC": [0, 3, 6, 9], "ETH": [0, 3, 6]}
    # rows come back in the frame's order, and the mask lines up with the frame
    assert kept["row"].to_list() == [r for r in frame["row"] if r in set(kept["row"])]
    mask = non_overlapping_mask(frame, 3)
    assert frame.filter(pl.Series(mask))["row"].to_list() == kept["row"].to_list()
    assert non_overlapping(frame, 1).height == 17


def test_non_overlapping_rejects_duplicates_and_missing_columns():
    frame = _panel({"BTC": 3})
    with pytest.raises(ValueError, match="duplicate"):
        non_overlapping(pl.concat([frame, frame]), 2)
    with pytest.raises(ValueError, match="no column"):
        non_overlapping(frame.drop("ts"), 2)


def test_compare_reports_dm_and_interval_per_baseline():
    rng = np.random.default_rng(4)
    n_ts, symbols = 300, ["A", "B"]
    ts = np.tile(np.arange(n_ts), 2)
    sym = np.repeat(symbols, n_ts)
    base = rng.gamma(2.0, 1.0, 2 * n_ts)
    losses = {
        "model": base,
        "good_baseline": base + 0.5 + rng.normal(0, 0.3, base.size),
        "twin": base.copy(),
    }
    out = compare(losses, "model", ["good_baseline", "twin"], horizon=5, ts=ts, symbols=sym)
    assert out["baseline"].to_list() == ["good_baseline", "twin"]
    first, twin = out.row(0, named=True), out.row(1, named=True)
    assert first["mean_diff"] == pytest.approx(-0.5, abs=0.05)
    assert first["ci_high"] < 0 and first["model_better"] and first["dm_p_value"] < 0.01
    assert (
        first["dm_n"] == n_ts and first["dm_lags"] == 8
    )  # 2 (horizon - 1) = 8 > ceil(300 ** (1/3)) = 7
    assert twin["mean_diff"] == 0.0 and twin["dm_p_value"] == 1.0 and not twin["model_better"]
    with pytest.raises(ValueError, match="no losses for"):
        compare(losses, "model", ["nope"], horizon=5, ts=ts, symbols=sym)


def test_compare_bootstraps_dates_not_symbols_so_correlated_symbols_add_no_information():
    """Two symbols whose loss differentials are the same series carry the information of one:
    the interval must be the one-symbol interval, not one sqrt(2) narrower (what resampling
    each symbol on its own would give)."""
    rng = np.random.default_rng(7)
    n = 400
    d = rng.normal(0.1, 1.0, n)
    one = compare(
        {"m": d, "b": np.zeros(n)},
        "m",
        ["b"],
        horizon=10,
        ts=np.arange(n),
        symbols=np.repeat("A", n),
    ).row(0, named=True)
    two = compare(
        {"m": np.r_[d, d], "b": np.zeros(2 * n)},
        "m",
        ["b"],
        horizon=10,
        ts=np.tile(np.arange(n), 2),
        symbols=np.repeat(["A", "B"], n),
    ).row(0, named=True)
    assert two["ci_low"] == pytest.approx(one["ci_low"]) and two["ci_high"] == pytest.approx(
        one["ci_high"]
    )
    assert two["dm_stat"] == pytest.approx(one["dm_stat"])
