"""Backtest engine: next-open fills, costs with the final exit, sizing, holding, metrics, the
deflated Sharpe ratio, the vectorized grid against single sets, plots and the benchmark."""

import io
import math
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy.stats import norm

from ml.backtest import (
    METRIC_COLUMNS,
    BacktestConfig,
    deflated_sharpe_ratio,
    expected_max_sharpe,
    hold_decisions,
    momentum_positions,
    parameter_grid,
    performance,
    plot_equity,
    positions_from_probabilities,
    run_backtest,
    run_grid,
    simulate,
)

ROOT = Path(__file__).resolve().parents[1]


def _frame(opens, p_up=None, p_down=None, symbol="X", start=datetime(2021, 1, 1), **extra):
    opens = np.asarray(opens, dtype=float)
    n = len(opens)
    return pl.DataFrame(
        {
            "symbol": symbol,
            "ts": [start + timedelta(days=i) for i in range(n)],
            "open": opens,
            "close": opens,
            "model_p_down": np.full(n, 0.3) if p_down is None else np.asarray(p_down, float),
            "model_p_up": np.full(n, 0.3) if p_up is None else np.asarray(p_up, float),
            **extra,
        }
    )


def _random_frame(n=300, seed=0, symbol="X"):
    rng = np.random.default_rng(seed)
    opens = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, n)))
    up = rng.uniform(0.1, 0.6, n)
    return _frame(
        opens,
        p_up=up,
        p_down=rng.uniform(0, 1 - up),
        symbol=symbol,
        model_sigma=rng.uniform(0.01, 0.04, n),
    )


# Five bars, opens 100, 100, 110, 99, 108.9: the open-to-open intervals 1->2, 2->3, 3->4 move
# +10%, -10%, +10%. Scores p_up - p_down at the closes: +0.3, +0.3, -0.3, 0, 0; threshold 0.1.
FIVE_OPENS = [100.0, 100.0, 110.0, 99.0, 108.9]
FIVE_UP = [0.5, 0.5, 0.2, 0.3, 0.3]
FIVE_DOWN = [0.2, 0.2, 0.5, 0.3, 0.3]


def test_long_short_fills_at_next_open_and_pays_every_change_including_the_final_exit():
    # cost per unit of position changed: (10 + 5) bps = 0.0015
    # decisions at closes 0, 1, 2: long, long, short -> held over intervals 1->2, 2->3, 3->4
    #   (the decision at close 0 is filled at open 1; closes 3 and 4 have no interval left)
    # gross: +1 * 0.10, +1 * -0.10, -1 * +0.10          = 0.10, -0.10, -0.10
    # changes: enter 0->1 at open 1 (1 unit), hold at open 2 (a long drifts to exactly 1: 0),
    #   flip 1->-1 at open 3 (2), final exit at open 4: the short grew with the +10% move to
    #   1 x 1.1 of the interval's starting equity (1.1 units, charged to the last interval)
    # cost: 0.0015, 0, 0.0030 + 0.00165                 = 0.0015, 0, 0.00465
    # net: 0.0985, -0.10, -0.10465
    # equity: 1.0985, 1.0985 * 0.9 = 0.98865, 0.98865 * 0.89535 = 0.8851877775
    frame = _frame(FIVE_OPENS, FIVE_UP, FIVE_DOWN)
    paths, metrics = run_backtest(frame, BacktestConfig(threshold=0.1, allow_short=True))
    p = paths.filter(pl.col("strategy") == "model")
    assert p["ts"].to_list() == frame["ts"].to_list()[1:4]  # intervals start at opens 1, 2, 3
    np.testing.assert_allclose(p["position"].to_numpy(), [1.0, 1.0, -1.0])
    np.testing.assert_allclose(p["gross_return"].to_numpy(), [0.10, -0.10, -0.10], atol=1e-12)
    np.testing.assert_allclose(p["cost"].to_numpy(), [0.0015, 0.0, 0.00465], atol=1e-12)
    np.testing.assert_allclose(p["net_return"].to_numpy(), [0.0985, -0.10, -0.10465], atol=1e-12)
    np.testing.assert_allclose(p["equity"].to_numpy(), [1.0985, 0.98865, 0.8851877775])
    m = metrics.filter(pl.col("strategy") == "model").row(0, named=True)
    assert m["total_return"] == pytest.approx(0.8851877775 - 1)
    # 4.1 units traded over 3 intervals = 3/365 years
    assert m["turnover_per_year"] == pytest.approx(4.1 / (3 / 365))


def test_holding_a_short_pays_for_keeping_its_weight_and_a_held_long_does_not():
    # opens 100, 100, 110, 121, 121: intervals +10%, +10%, 0; cost 0.001 per unit
    # short -1 held over the first two intervals, then flat:
    #   open 1: enter 0 -> -1 (1 unit)
    #   open 2: the short drifted to -1 x 1.1 / (1 - 0.1) = -1.2222...; back to -1: 0.2222 units
    #   open 3: drifted to -1.2222 again; to flat: 1.2222 units
    # a long 1 drifts to 1 x 1.1 / 1.1 = 1: nothing traded while held
    opens = np.array([100.0, 100.0, 110.0, 121.0, 121.0])
    short = simulate(opens, np.array([[-1.0, -1.0, 0.0, 0.0, 0.0]]), 0.001)
    np.testing.assert_allclose(short.cost[0], [0.001, 0.001 * 2 / 9, 0.001 * 11 / 9], atol=1e-15)
    long = simulate(opens, np.array([[1.0, 1.0, 0.0, 0.0, 0.0]]), 0.001)
    np.testing.assert_allclose(long.cost[0], [0.001, 0.0, 0.001], atol=1e-15)


def test_long_only_goes_flat_instead_of_short_and_pays_its_exit_when_it_happens():
    # same bars; long only: the short decision at close 2 becomes flat
    # held: 1, 1, 0; changes: enter at open 1 (1), hold (0), exit 1->0 at open 3 (1), nothing
    #   left to close at open 4
    # cost: 0.0015, 0, 0.0015; net: 0.0985, -0.10, -0.0015
    # equity: 1.0985, 0.98865, 0.98865 * 0.9985 = 0.987167025
    frame = _frame(FIVE_OPENS, FIVE_UP, FIVE_DOWN)
    paths, _ = run_backtest(frame, BacktestConfig(threshold=0.1, allow_short=False))
    p = paths.filter(pl.col("strategy") == "model")
    np.testing.assert_allclose(p["position"].to_numpy(), [1.0, 1.0, 0.0])
    np.testing.assert_allclose(p["cost"].to_numpy(), [0.0015, 0.0, 0.0015], atol=1e-12)
    np.testing.assert_allclose(p["equity"].to_numpy(), [1.0985, 0.98865, 0.987167025])


def test_a_decision_cannot_capture_the_move_it_already_saw():
    bars = np.array([100.0, 100.0, 110.0, 121.0])
    # long decided at close 0 earns open 1 -> open 2 (+10%); decided at close 1 earns 2 -> 3
    first = simulate(bars, np.array([[1.0, 0.0, 0.0, 0.0]]), 0.0)
    second = simulate(bars, np.array([[0.0, 1.0, 0.0, 0.0]]), 0.0)
    np.testing.assert_allclose(first.net_return[0], [0.10, 0.0], atol=1e-12)
    np.testing.assert_allclose(second.net_return[0], [0.0, 0.10], atol=1e-12)


def test_buy_and_hold_pays_the_entry_and_the_exit_cost_once():
    # opens 100, 100, 110, 121, 121: intervals +10%, +10%, 0; 10 bps fee, no slippage
    # net: 0.10 - 0.001 (entry at open 1), 0.10, 0 - 0.001 (exit at open 4)
    # equity: 1.099 * 1.1 * 0.999 = 1.2076911; 2 units traded in all
    frame = _frame([100.0, 100.0, 110.0, 121.0, 121.0])
    paths, metrics = run_backtest(frame, BacktestConfig(fee_bps=10, slippage_bps=0))
    bh = paths.filter(pl.col("strategy") == "buy_and_hold")
    np.testing.assert_allclose(bh["cost"].to_numpy(), [0.001, 0.0, 0.001], atol=1e-12)
    row = metrics.filter(pl.col("strategy") == "buy_and_hold").row(0, named=True)
    assert row["total_return"] == pytest.approx(1.2076911 - 1)
    assert row["turnover_per_year"] == pytest.approx(2 / (3 / 365))
    assert set(metrics["strategy"]) == {"model", "buy_and_hold", "momentum"}
    assert metrics["periods_per_year"][0] == 365


def test_vol_targeting_sizes_by_target_over_annualized_sigma_capped_by_leverage():
    # size = 0.2 / (0.02 * sqrt(365)) = 0.2 / 0.38209946 = 0.5234239
    params = pl.concat(
        [
            BacktestConfig(vol_target=0.2, max_leverage=2.0).params(),
            BacktestConfig(vol_target=0.2, max_leverage=0.5)
            .params()
            .with_columns(param_id=pl.lit(1, pl.Int64)),
            BacktestConfig().params().with_columns(param_id=pl.lit(2, pl.Int64)),
        ]
    )
    p_up = np.array([0.6, 0.1, 0.6, 0.6])
    p_down = np.array([0.1, 0.6, 0.1, 0.1])
    sigma = np.array([0.02, 0.02, np.nan, 0.0])
    pos = positions_from_probabilities(p_down, p_up, params, ppy=365, sigma=sigma)
    # bars 2 and 3 have no usable sigma: no position; the unsized set ignores sigma
    np.testing.assert_allclose(pos[0], [0.5234239, -0.5234239, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(pos[1], [0.5, -0.5, 0.0, 0.0])
    np.testing.assert_allclose(pos[2], [1.0, -1.0, 1.0, 1.0])


def test_vol_targeting_without_a_sigma_forecast_is_refused():
    with pytest.raises(ValueError, match="sigma"):
        positions_from_probabilities(
            np.zeros(3), np.ones(3), BacktestConfig(vol_target=0.2).params(), ppy=365
        )


def test_run_backtest_sizes_from_the_forecasters_sigma_column():
    # constant sigma 0.01 per bar on a calendar with weekends (365 periods a year)
    # size = min(0.1 / (0.01 * sqrt(365)), 2) = 0.1 / 0.19104973 = 0.5234239
    frame = _frame([100.0] * 6, p_up=[0.6] * 6, p_down=[0.1] * 6, model_sigma=[0.01] * 6)
    paths, _ = run_backtest(frame, BacktestConfig(vol_target=0.1))
    p = paths.filter(pl.col("strategy") == "model")
    np.testing.assert_allclose(p["position"].to_numpy(), [0.5234239] * 4, rtol=1e-6)


def test_holding_period_takes_decisions_every_h_bars_and_holds_them():
    raw = np.array([[1.0, 0.0, -1.0, 0.0, 1.0, 1.0, -1.0], [1.0, 0.0, -1.0, 0.0, 1.0, 1.0, -1.0]])
    held = hold_decisions(raw, np.array([3, 1]))
    # decision bars 0, 3, 6 for h = 3; h = 1 leaves the decisions as they are
    np.testing.assert_array_equal(held[0], [1, 1, 1, 0, 0, 0, -1])
    np.testing.assert_array_equal(held[1], raw[1])


def test_holding_period_limits_trading_in_a_backtest():
    # scores flip every bar: +, -, +, -, ...; hold 2 keeps each decision two intervals
    n = 8
    up = np.where(np.arange(n) % 2 == 0, 0.6, 0.1)
    frame = _frame([100.0] * n, p_up=up, p_down=0.7 - up)
    paths, _ = run_backtest(frame, BacktestConfig(holding_period=2))
    pos = paths.filter(pl.col("strategy") == "model")["position"].to_numpy()
    np.testing.assert_array_equal(pos, [1, 1, 1, 1, 1, 1])  # decision bars 0, 2, 4 are all +


def test_momentum_is_the_sign_of_the_trailing_return_and_looks_back_only():
    close = np.array([1.0, 2.0, 3.0, 2.0, 1.0])
    # t=2: 3 vs 1 up; t=3: 2 vs 2 flat; t=4: 1 vs 3 down; t<2: no trailing return yet
    np.testing.assert_array_equal(momentum_positions(close, 2, True), [0, 0, 1, 0, -1])
    np.testing.assert_array_equal(momentum_positions(close, 2, False), [0, 0, 1, 0, 0])
    changed = close.copy()
    changed[4] = 100.0
    np.testing.assert_array_equal(momentum_positions(changed, 2, True)[:4], [0, 0, 1, 0])


def test_performance_figures_by_hand():
    # opens 100, 100, 110, 55, 55, 66 -> intervals +0.1, -0.5, 0, +0.2; held 1, 1, 0, 1; no cost
    sim = simulate(
        np.array([100.0, 100.0, 110.0, 55.0, 55.0, 66.0]),
        np.array([[1.0, 1.0, 0.0, 1.0, 0.0, 0.0]]),
        0.0,
    )
    perf = {k: v[0] for k, v in performance(sim, ppy=252).items()}
    # equity 1.1, 0.55, 0.55, 0.66: the trough 0.55 is half the peak 1.1
    assert perf["total_return"] == pytest.approx(-0.34)
    assert perf["max_drawdown"] == pytest.approx(-0.5)
    np.testing.assert_allclose(sim.drawdown[0], [0.0, -0.5, -0.5, -0.4])
    assert perf["hit_rate"] == pytest.approx(2 / 3)  # in market 3 intervals, 2 of them up
    assert perf["exposure"] == pytest.approx(0.75)
    # 1 + 0 + 1 + 1 units, and the exit at the last open of the long grown by +20%: 1.2 units;
    # 4.2 over 4/252 years
    assert perf["turnover_per_year"] == pytest.approx(4.2 / (4 / 252))
    # mean -0.05; deviations .15 -.45 .05 .25: sum sq 0.29, sd = sqrt(0.29/3) = 0.3109126
    assert perf["sharpe_per_bar"] == pytest.approx(-0.05 / 0.3109126, rel=1e-6)
    assert perf["sharpe"] == pytest.approx(-0.05 / 0.3109126 * math.sqrt(252), rel=1e-6)
    # downside deviation sqrt(0.25 / 4) = 0.25
    assert perf["sortino"] == pytest.approx(-0.2 * math.sqrt(252))
    # m2 = 0.0725, m3 = -0.072/4 = -0.018, m4 = 0.045425/4 = 0.01135625
    assert perf["skewness"] == pytest.approx(-0.018 / 0.0725**1.5)
    assert perf["kurtosis"] == pytest.approx(0.01135625 / 0.0725**2)
    assert perf["cagr"] == pytest.approx(0.66 ** (252 / 4) - 1)


def test_a_leveraged_wipeout_leaves_equity_at_zero():
    # 2x long through a -60% interval loses 120%: equity is gone and stays gone
    sim = simulate(np.array([100.0, 100.0, 40.0, 80.0]), np.array([[2.0, 2.0, 0.0, 0.0]]), 0.0)
    np.testing.assert_allclose(sim.equity[0], [0.0, 0.0])
    assert performance(sim, 365)["cagr"][0] == -1.0


def test_stock_calendar_annualizes_with_252():
    start = datetime(2021, 1, 4)  # a Monday
    days = [d for d in (start + timedelta(days=i) for i in range(60)) if d.weekday() < 5]
    frame = _frame(np.linspace(10, 12, len(days))).with_columns(ts=pl.Series(days))
    _, metrics = run_backtest(frame, BacktestConfig())
    assert metrics["periods_per_year"][0] == 252


def test_deflated_sharpe_ratio_matches_the_papers_worked_example():
    # Bailey & Lopez de Prado (2014), section 6: best annualized SR 2.5 of N = 100 trials whose
    # annualized SR variance is 0.5, T = 1250 daily returns (250 a year), skew -3, kurtosis 10.
    # per day: SR = 2.5 / sqrt(250) = 0.1581139, V = 0.5 / 250 = 0.002
    # SR0 = sqrt(0.002) * ((1 - 0.5772157) * 2.3263479 + 0.5772157 * 2.6802104)
    #     = 0.0447214 * (0.9835780 + 1.5470792) = 0.1131720
    # z = (0.1581139 - 0.1131720) * sqrt(1249) / sqrt(1 + 3 * 0.1581139 + 9/4 * 0.025)
    #   = 0.0449419 * 35.341194 / sqrt(1.5305917) = 1.5883... / 1.2371709 = 1.28382
    # DSR = Phi(1.28382) = 0.90040 (the paper reports 0.9004)
    sr, var = 2.5 / math.sqrt(250), 0.5 / 250
    assert expected_max_sharpe(var, 100) == pytest.approx(0.1131720, rel=1e-5)
    dsr = deflated_sharpe_ratio(sr, var, n_trials=100, n_obs=1250, skewness=-3, kurtosis=10)
    assert dsr == pytest.approx(0.90040, abs=5e-5)


def test_deflated_sharpe_with_one_trial_is_the_probabilistic_sharpe_against_zero():
    # N = 1: SR0 = 0; SR 0.1, T 101, normal returns: z = 0.1 * 10 / sqrt(1 + 0.5 * 0.01)
    dsr = deflated_sharpe_ratio(0.1, 0.3, n_trials=1, n_obs=101, skewness=0.0, kurtosis=3.0)
    assert dsr == pytest.approx(norm.cdf(1 / math.sqrt(1.005)))
    # more trials raise the bar the same Sharpe has to clear
    assert deflated_sharpe_ratio(0.1, 0.003, 50, 101, 0.0, 3.0) < dsr


def test_deflated_sharpe_refuses_an_annualized_sharpe_with_heavy_skew():
    with pytest.raises(ValueError, match="per-period"):
        deflated_sharpe_ratio(3.0, 0.01, 10, 500, skewness=2.0, kurtosis=3.0)


def test_parameter_grid_crosses_every_axis_in_product_order():
    grid = parameter_grid(
        thresholds=(0.0, 0.2),
        allow_short=(True, False),
        holding_periods=(1, 90),
        vol_targets=(None, 0.15),
        costs_bps=((10.0, 5.0), (0.0, 0.0)),
    )
    assert grid.height == 32
    assert grid["param_id"].to_list() == list(range(32))
    first, last = grid.row(0, named=True), grid.row(31, named=True)
    assert (first["threshold"], first["allow_short"], first["vol_target"]) == (0.0, True, None)
    assert (last["threshold"], last["holding_period"], last["fee_bps"]) == (0.2, 90, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "column"),
    [
        ({"thresholds": (1.5,)}, "threshold"),
        ({"holding_periods": (0,)}, "holding_period"),
        ({"vol_targets": (-0.1,)}, "vol_target"),
        ({"costs_bps": ((-1.0, 0.0),)}, "fee_bps"),
        ({"max_leverages": (0.0,)}, "max_leverage"),
    ],
)
def test_bad_grid_values_are_refused_naming_the_column(kwargs, column):
    with pytest.raises(ValueError, match=column):
        parameter_grid(**kwargs)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="fee_bps"):
        BacktestConfig(fee_bps=-1)
    with pytest.raises(ValueError, match="momentum_window"):
        BacktestConfig(momentum_window=0)


def test_too_few_bars_are_refused():
    with pytest.raises(ValueError, match="at least 3 bars"):
        simulate(np.array([1.0, 1.0]), np.array([[1.0, 1.0]]), 0.0)


def _loop_net_returns(frame: pl.DataFrame, row: dict, ppy: int) -> np.ndarray:
    """Reference: the rules of ml.backtest written bar by bar, one parameter set."""
    opens = frame["open"].to_numpy()
    score = frame["model_p_up"].to_numpy() - frame["model_p_down"].to_numpy()
    sigma = frame["model_sigma"].to_numpy()
    rate = (row["fee_bps"] + row["slippage_bps"]) / 1e4
    h = row["holding_period"]
    current, drifted, net = 0.0, 0.0, []
    for t in range(len(opens) - 2):
        if t % h == 0:
            direction = 0.0
            if score[t] > row["threshold"]:
                direction = 1.0
            elif score[t] < -row["threshold"] and row["allow_short"]:
                direction = -1.0
            size = 1.0
            if row["vol_target"] is not None:
                size = min(row["vol_target"] / (sigma[t] * math.sqrt(ppy)), row["max_leverage"])
            current = direction * size
        r = opens[t + 2] / opens[t + 1] - 1
        cost = abs(current - drifted) * rate
        if t == len(opens) - 3:
            cost += abs(current) * (1 + r) * rate
        net.append(current * r - cost)
        # the weight the next open trades from: the position and the equity both moved
        grown = 1 + current * r
        drifted = current * (1 + r) / grown if grown > 0 else 0.0
    return np.array(net)


def test_vectorized_grid_equals_each_set_alone_and_a_bar_by_bar_loop():
    frame = pl.concat([_random_frame(200, seed=1, symbol="A"), _random_frame(150, seed=2)])
    grid = parameter_grid(
        thresholds=(0.0, 0.15),
        allow_short=(True, False),
        holding_periods=(1, 7),
        vol_targets=(None, 0.3),
        costs_bps=((10.0, 5.0), (2.0, 0.0)),
        max_leverages=(1.5,),
    )
    result = run_grid(frame, grid, BacktestConfig())
    for row in result.params.drop("is_default").iter_rows(named=True):
        cfg = BacktestConfig(**{k: v for k, v in row.items() if k != "param_id"})
        paths, alone = run_backtest(frame, cfg)
        for symbol in ("A", "X"):
            got = result.metrics.filter(
                (pl.col("param_id") == row["param_id"]) & (pl.col("symbol") == symbol)
            )
            want = alone.filter((pl.col("strategy") == "model") & (pl.col("symbol") == symbol))
            np.testing.assert_allclose(
                got.select(METRIC_COLUMNS).to_numpy(), want.select(METRIC_COLUMNS).to_numpy()
            )
            net = paths.filter((pl.col("strategy") == "model") & (pl.col("symbol") == symbol))
            bars = frame.filter(pl.col("symbol") == symbol)
            np.testing.assert_allclose(
                net["net_return"].to_numpy(), _loop_net_returns(bars, row, 365), atol=1e-12
            )


def test_grid_summary_headlines_the_default_and_deflates_the_best_of_its_cost_level():
    frame = _random_frame(400, seed=3)
    grid = parameter_grid(
        thresholds=(0.0, 0.05, 0.2, 0.3),
        holding_periods=(1, 5),
        costs_bps=((10.0, 5.0), (0.0, 0.0)),
    )
    cfg = BacktestConfig(threshold=0.12)  # not in the grid: added as one more set
    result = run_grid(frame, grid, cfg)
    assert result.params.height == 17
    default = result.params.filter("is_default").row(0, named=True)
    assert (default["param_id"], default["threshold"]) == (16, 0.12)
    s = result.summary.row(0, named=True)
    assert s["default_param_id"] == 16
    assert s["default_params"] == "threshold 0.12, long/short, hold 1, unit size, 10+5 bps"
    m = result.metrics
    assert s["default_sharpe"] == m.filter(pl.col("param_id") == 16)["sharpe"][0]
    # trials: the 8 grid sets at 10+5 bps and the default; the 0-bps sets are no real choice
    trials = m.filter(pl.col("param_id").is_in([0, 2, 4, 6, 8, 10, 12, 14, 16]))
    assert s["n_trials"] == 9
    best = trials.sort("sharpe", descending=True).row(0, named=True)
    assert (s["best_param_id"], s["best_sharpe"]) == (best["param_id"], best["sharpe"])
    var = float(np.var(trials["sharpe_per_bar"].to_numpy(), ddof=1))
    assert s["best_deflated_sharpe"] == pytest.approx(
        deflated_sharpe_ratio(
            best["sharpe_per_bar"], var, 9, 398, best["skewness"], best["kurtosis"]
        )
    )
    assert s["expected_max_sharpe"] == pytest.approx(expected_max_sharpe(var, 9) * math.sqrt(365))
    # baselines at every cost level; the summary quotes them at the default's
    assert result.baselines.height == 4
    bh = result.baselines.filter((pl.col("strategy") == "buy_and_hold") & (pl.col("fee_bps") == 10))
    assert s["buy_and_hold_sharpe"] == bh["sharpe"][0]


def test_the_best_set_is_deflated_by_every_forecasters_trials_of_the_symbol():
    """A user can pick any forecaster's best set, so the trials are sets x forecasters."""
    frame = _random_frame(400, seed=5)
    rng = np.random.default_rng(6)
    up = rng.uniform(0.1, 0.6, frame.height)
    frame = frame.with_columns(
        other_p_up=pl.Series(up), other_p_down=pl.Series(rng.uniform(0, 1 - up))
    )
    grid = parameter_grid(thresholds=(0.0, 0.1, 0.2), holding_periods=(1, 5))
    cfg = BacktestConfig(threshold=0.1)  # in the grid: 6 sets per forecaster
    result = run_grid(frame, grid, cfg, forecasters=("model", "other"))
    pool = result.metrics
    assert pool.height == 12
    var = float(np.var(pool["sharpe_per_bar"].to_numpy(), ddof=1))
    for s in result.summary.iter_rows(named=True):
        assert s["n_trials"] == 12
        best = pool.filter(pl.col("strategy") == s["strategy"]).sort("sharpe", descending=True)
        b = best.row(0, named=True)
        assert s["best_deflated_sharpe"] == pytest.approx(
            deflated_sharpe_ratio(b["sharpe_per_bar"], var, 12, 398, b["skewness"], b["kurtosis"])
        )


def test_plot_shows_equity_and_drawdown_panels_per_symbol():
    frame = pl.concat([_random_frame(60, seed=4, symbol="A"), _random_frame(60, seed=5)])
    paths, _ = run_backtest(frame, BacktestConfig())
    fig = plot_equity(paths, "test")
    axes = fig.get_axes()
    assert len(axes) == 4  # equity and drawdown for each of two symbols
    assert [ax.get_ylabel() for ax in axes] == ["equity", "drawdown %"] * 2
    assert len(axes[1].get_lines()) == 3  # model, buy-and-hold, momentum
    dd = paths.filter((pl.col("symbol") == "A") & (pl.col("strategy") == "model"))["drawdown"]
    np.testing.assert_allclose(axes[1].get_lines()[0].get_ydata(), 100 * dd.to_numpy())
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
