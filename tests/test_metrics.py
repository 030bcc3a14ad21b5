"""ml.metrics: every metric against numbers worked out by hand (arithmetic in the comments)."""

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from ml.metrics import (
    PRIMARY_LOSS,
    TARGET_METRICS,
    VARIANCE_FLOOR,
    absolute_error_per_row,
    brier_per_row,
    classification_report,
    direction_report,
    expected_calibration_error,
    pinball_per_row,
    qlike_per_row,
    quantile_loss_per_row,
    quantile_report,
    reliability_table,
    returns_report,
    sigma_qlike_per_row,
    sigma_report,
    squared_error_per_row,
    winkler_per_row,
)


@pytest.fixture
def scored():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 500)
    logits = rng.normal(0, 1, (500, 3)) + 1.5 * np.eye(3)[y] * rng.random((500, 1))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_metrics_agree_with_scikit_learn(scored):
    y, p = scored
    rep = classification_report(y, p)
    pred = p.argmax(1)
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert rep["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert rep["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert rep["log_loss"] == pytest.approx(skm.log_loss(y, p, labels=[0, 1, 2]))
    onehot = np.eye(3)[y]
    assert rep["brier"] == pytest.approx(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def test_a_perfect_forecast_scores_perfectly():
    y = np.array([0, 1, 2, 2])
    rep = classification_report(y, np.eye(3)[y])
    assert rep["accuracy"] == 1.0 and rep["macro_f1"] == 1.0 and rep["brier"] == 0.0
    assert rep["log_loss"] < 1e-9


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match="probabilities must be"):
        classification_report(np.array([0, 1]), np.ones((3, 3)) / 3)


def test_direction_inputs_with_nan_or_unknown_labels_are_rejected():
    p = np.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="y must be integer class labels"):
        direction_report(np.array([0.0, np.nan]), p)
    with pytest.raises(ValueError, match=r"labels outside 0\.\.2"):
        direction_report(np.array([0, 3]), p)
    with pytest.raises(ValueError, match="p has 1 NaN"):
        direction_report(np.array([0, 1]), np.array([[0.2, 0.3, 0.5], [np.nan, 0.5, 0.5]]))


# y = [0, 1, 2, 2]; arg-max predictions 0, 1, 2, 0
DIR_Y = np.array([0, 1, 2, 2])
DIR_P = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])


def test_direction_report_matches_hand_computation():
    rep = direction_report(DIR_Y, DIR_P)
    assert list(rep) == ["log_loss", "brier", "accuracy", "balanced_accuracy", "macro_f1"]
    # -(ln .6 + ln .5 + ln .7 + ln .2) / 4 = (0.510826 + 0.693147 + 0.356675 + 1.609438) / 4
    assert rep["log_loss"] == pytest.approx(0.7925215, abs=1e-6)
    # rows: .16+.09+.01=.26, .04+.25+.09=.38, .01+.04+.09=.14, .25+.09+.64=.98 -> 1.76 / 4
    assert rep["brier"] == pytest.approx(0.44)
    assert rep["accuracy"] == pytest.approx(0.75)  # 3 of 4 right
    # recalls: class 0 1/1, class 1 1/1, class 2 1/2 -> 2.5 / 3
    assert rep["balanced_accuracy"] == pytest.approx(2.5 / 3)
    # F1: class 0 tp1 fp1 fn0 -> 2/3; class 1 -> 1; class 2 tp1 fp0 fn1 -> 2/3; mean 7/9
    assert rep["macro_f1"] == pytest.approx(7 / 9)


def test_brier_per_row_is_the_squared_distance_to_the_outcome():
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    # row 0, y=0: .3^2 + .2^2 + .1^2 = .14; row 1, y=2: .2^2 + .3^2 + .5^2 = .38
    np.testing.assert_allclose(brier_per_row(np.array([0, 2]), p), [0.14, 0.38])


def test_pinball_loss_weights_misses_by_the_level():
    y, q = np.array([1.0, -1.0, 0.5]), np.array([0.0, 0.0, 0.5])
    # level .1: y above q costs .1 * 1, below costs .9 * 1, on it 0
    np.testing.assert_allclose(pinball_per_row(y, q, 0.1), [0.1, 0.9, 0.0])
    np.testing.assert_allclose(pinball_per_row(y, q, 0.9), [0.9, 0.1, 0.0])
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        pinball_per_row(y, q, 1.5)


def test_winkler_score_is_width_plus_scaled_miss():
    y = np.array([0.0, 2.0, -3.0])
    lower, upper = np.full(3, -1.0), np.full(3, 1.0)
    # width 2; misses: 0, 1 above, 2 below; 2 / alpha = 10 -> 2, 12, 22
    np.testing.assert_allclose(winkler_per_row(y, lower, upper, 0.2), [2.0, 12.0, 22.0])


def test_winkler_rejects_crossed_intervals():
    with pytest.raises(ValueError, match="lower > upper on 1 rows"):
        winkler_per_row(np.zeros(2), np.array([0.0, 1.0]), np.array([1.0, 0.0]), 0.2)


def test_quantile_report_matches_hand_computation():
    y = np.array([0.0, 2.0, -3.0, 0.5])
    lower, upper = np.full(4, -1.0), np.full(4, 1.0)
    rep = quantile_report(y, lower, upper)
    # q10 = -1: y - q = 1, 3, -2, 1.5 -> .1, .3, 1.8, .15 -> 2.35 / 4
    assert rep["pinball_q10"] == pytest.approx(0.5875)
    # q90 = 1: y - q = -1, 1, -4, -.5 -> .1, .9, .4, .05 -> 1.45 / 4
    assert rep["pinball_q90"] == pytest.approx(0.3625)
    assert rep["coverage"] == 0.5  # 0 and .5 inside
    assert rep["below_lower"] == 0.25 and rep["above_upper"] == 0.25
    # 2 + 12 + 22 + 2 = 38 over 4 rows; equals 10 * (pinball_q10 + pinball_q90) row by row
    assert rep["winkler"] == pytest.approx(9.5)
    assert rep["winkler"] == pytest.approx(10 * (rep["pinball_q10"] + rep["pinball_q90"]))


def test_quantile_report_names_follow_the_levels_and_need_a_central_interval():
    y, lo, hi = np.array([0.0]), np.array([-1.0]), np.array([1.0])
    rep = quantile_report(y, lo, hi, levels=(0.05, 0.95))
    assert {"pinball_q05", "pinball_q95"} <= set(rep)
    with pytest.raises(ValueError, match="central interval"):
        quantile_report(y, lo, hi, levels=(0.1, 0.8))


def test_quantile_loss_is_the_sum_of_both_pinball_losses():
    # y = 2 against q10 = -1 (.1 * 3 = .3) and q90 = 1 (.9 * 1 = .9)
    loss = quantile_loss_per_row(np.array([2.0]), np.array([-1.0]), np.array([1.0]))
    np.testing.assert_allclose(loss, [1.2])


def test_qlike_is_zero_at_the_truth_and_floors_zeros():
    rv, fv = np.array([1.0, 4.0, 0.0]), np.array([1.0, 2.0, 1.0])
    # ratio 1 -> 0; ratio 2 -> 2 - ln 2 - 1; rv 0 floored: 1e-12 - ln(1e-12) - 1 = 26.631021
    expected = [0.0, 1 - math.log(2), VARIANCE_FLOOR - math.log(VARIANCE_FLOOR) - 1]
    np.testing.assert_allclose(qlike_per_row(rv, fv), expected)
    assert expected[2] == pytest.approx(26.631021, abs=1e-6)
    zero_forecast = qlike_per_row(np.array([1.0]), np.array([0.0]))
    assert np.isfinite(zero_forecast).all() and zero_forecast[0] > 1e11
    with pytest.raises(ValueError, match="forecast_var has 1 negative"):
        qlike_per_row(np.array([1.0]), np.array([-1.0]))


def test_sigma_qlike_squares_the_sigmas():
    # sigmas 2 and sqrt 2 -> variances 4 and 2 -> ratio 2 -> 1 - ln 2
    np.testing.assert_allclose(
        sigma_qlike_per_row(np.array([2.0]), np.array([math.sqrt(2)])), [1 - math.log(2)]
    )


def test_sigma_report_matches_hand_computation():
    rs = np.array([1.0, 2.0, 3.0])  # rv = 1, 4, 9
    fs = np.sqrt([1.0, 2.0, 3.0])  # fv = 1, 2, 3
    rep = sigma_report(rs, fs)
    # ratios 1, 2, 3: 0 + (1 - ln 2) + (2 - ln 3) = 1.208241 over 3
    assert rep["qlike"] == pytest.approx((3 - math.log(2) - math.log(3)) / 3)
    assert rep["mse_var"] == pytest.approx(40 / 3)  # (0 + 4 + 36) / 3
    # MZ: fv - 2 = -1, 0, 1; rv - 14/3 = -11/3, -2/3, 13/3; Sxx = 2, Sxy = 24/3 = 8
    assert rep["mz_beta"] == pytest.approx(4.0)
    assert rep["mz_alpha"] == pytest.approx(14 / 3 - 8)
    # Syy = (121 + 4 + 169) / 9 = 294 / 9; R2 = Sxy^2 / (Sxx Syy) = 64 * 9 / 588
    assert rep["mz_r2"] == pytest.approx(576 / 588)
    # sigma errors 0, 2 - sqrt 2, 3 - sqrt 3
    expected_rmse = math.sqrt(((2 - math.sqrt(2)) ** 2 + (3 - math.sqrt(3)) ** 2) / 3)
    assert rep["rmse_sigma"] == pytest.approx(expected_rmse)


def test_sigma_report_of_a_constant_forecast_has_no_regression():
    rep = sigma_report(np.array([1.0, 2.0, 3.0]), np.full(3, 2.0))
    assert math.isnan(rep["mz_beta"]) and math.isnan(rep["mz_alpha"]) and math.isnan(rep["mz_r2"])
    assert rep["rmse_sigma"] == pytest.approx(math.sqrt(2 / 3))  # errors -1, 0, 1


def test_point_errors_per_row():
    y, f = np.array([1.0, -2.0]), np.array([0.5, 1.0])
    np.testing.assert_allclose(squared_error_per_row(y, f), [0.25, 9.0])
    np.testing.assert_allclose(absolute_error_per_row(y, f), [0.5, 3.0])


def test_per_row_losses_name_the_bad_argument():
    with pytest.raises(ValueError, match="f has 1 NaN"):
        absolute_error_per_row(np.zeros(2), np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match="same length"):
        squared_error_per_row(np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="y must be one-dimensional"):
        absolute_error_per_row(np.zeros((2, 2)), np.zeros(2))


def test_returns_report_matches_hand_computation():
    y = np.array([0.1, -0.2, 0.3, -0.4])
    f = np.array([0.05, 0.1, 0.2, 0.0])
    rep = returns_report(y, f)
    assert rep["mae"] == pytest.approx(0.2125)  # (.05 + .3 + .1 + .4) / 4
    # ranks f: 2 3 4 1, ranks y: 3 2 4 1, d = -1 1 0 0: 1 - 6 * 2 / (4 * 15) = 0.8
    assert rep["rank_ic"] == pytest.approx(0.8)
    # f != 0 on rows 0-2: signs agree on rows 0 and 2
    assert rep["hit_rate"] == pytest.approx(2 / 3)


def test_returns_report_of_a_zero_forecast_is_nan_not_a_fake_score():
    y = np.array([0.1, -0.2, 0.3])
    rep = returns_report(y, np.zeros(3))
    assert math.isnan(rep["rank_ic"]) and math.isnan(rep["hit_rate"])
    assert rep["mae"] == pytest.approx(0.2)


# y = [0, 0, 1, 2] with two bins [0, .5) and [.5, 1]
CAL_Y = np.array([0, 0, 1, 2])
CAL_P = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6], [0.45, 0.05, 0.5]])


def test_reliability_table_matches_hand_computation():
    table = reliability_table(CAL_Y, CAL_P, n_bins=2)
    assert table.columns == [
        "class",
        "bin_low",
        "bin_high",
        "mean_predicted",
        "observed_frequency",
        "count",
    ]
    rows = {(r["class"], r["bin_low"]): r for r in table.to_dicts()}
    # class 0, low bin: rows 1-3 (.3, .2, .45), one of them (row 1) is class 0
    assert rows[(0, 0.0)]["mean_predicted"] == pytest.approx(0.95 / 3)
    assert rows[(0, 0.0)]["observed_frequency"] == pytest.approx(1 / 3)
    assert rows[(0, 0.0)]["count"] == 3
    assert rows[(0, 0.5)]["mean_predicted"] == pytest.approx(0.8)
    assert rows[(0, 0.5)]["observed_frequency"] == 1.0
    # class 1, high bin: row 1 only (.6), labelled 0
    assert rows[(1, 0.5)]["observed_frequency"] == 0.0 and rows[(1, 0.5)]["count"] == 1
    # class 2, high bin: rows 2, 3 (.6, .5 -- .5 opens the upper bin), one labelled 2
    assert rows[(2, 0.5)]["mean_predicted"] == pytest.approx(0.55)
    assert rows[(2, 0.5)]["observed_frequency"] == 0.5
    assert rows[(2, 0.5)]["bin_high"] == 1.0
    assert table["count"].sum() == 4 * 3  # every row once per class


def test_expected_calibration_error_matches_hand_computation():
    # class 0: 3/4 * |.95/3 - 1/3| + 1/4 * |.8 - 1| = .0125 + .05 = .0625
    # class 1: 3/4 * |.35/3 - 1/3| + 1/4 * |.6 - 0| = .1625 + .15 = .3125
    # class 2: 2/4 * |.1 - 0| + 2/4 * |.55 - .5| = .05 + .025 = .075; mean .15
    assert expected_calibration_error(CAL_Y, CAL_P, n_bins=2) == pytest.approx(0.15)
    y = np.array([0, 1, 2, 1])
    assert expected_calibration_error(y, np.eye(3)[y]) == 0.0


def test_registries_cover_every_target_with_matching_arguments():
    assert (
        set(TARGET_METRICS) == set(PRIMARY_LOSS) == {"direction", "quantiles", "sigma", "returns"}
    )
    y = np.array([0.0, 2.0, -3.0, 0.5])
    lower, upper = np.full(4, -1.0), np.full(4, 1.0)
    loss = PRIMARY_LOSS["quantiles"](y, lower, upper)
    rep = TARGET_METRICS["quantiles"](y, lower, upper)
    assert loss.mean() == pytest.approx(rep["pinball_q10"] + rep["pinball_q90"])
    assert PRIMARY_LOSS["direction"](DIR_Y, DIR_P).mean() == pytest.approx(
        TARGET_METRICS["direction"](DIR_Y, DIR_P)["log_loss"]
    )
    rs, fs = np.array([1.0, 2.0, 3.0]), np.sqrt([1.0, 2.0, 3.0])
    assert PRIMARY_LOSS["sigma"](rs, fs).mean() == pytest.approx(sigma_report(rs, fs)["qlike"])
    f = np.array([0.05, 0.1, 0.2, 0.0])
    assert PRIMARY_LOSS["returns"](y, f).mean() == pytest.approx(returns_report(y, f)["mse"])
