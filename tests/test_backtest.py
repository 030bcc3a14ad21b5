from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ml.backtest import BacktestConfig, performance, run_backtest, simulate


def _bars(opens, start=datetime(2021, 1, 1)):
    opens = np.asarray(opens, dtype=float)
    return pl.DataFrame(
        {
            "ts": [start + timedelta(days=i) for i in range(len(opens))],
            "open": opens,
            "close": opens * 1.0,
        }
    )


def test_positions_are_entered_at_the_next_open():
    bars = _bars([100, 100, 110, 121])
    cfg = BacktestConfig(fee_bps=0, slippage_bps=0)
    # decide long at the close of bar 0: enter at open of bar 1 (100), earn open 1 -> open 2
    path = simulate(bars, np.array([1.0, 0.0, 0.0, 0.0]), cfg)
    assert path["ts"].to_list()[0] == bars["ts"][1]
    np.testing.assert_allclose(path["net_return"].to_numpy(), [0.10, 0.0])
    # a decision at the close of bar 1 cannot capture the bar 1 -> 2 move it already saw
    path = simulate(bars, np.array([0.0, 1.0, 0.0, 0.0]), cfg)
    np.testing.assert_allclose(path["net_return"].to_numpy(), [0.0, 0.10])


def test_costs_are_charged_on_each_change_of_position():
    bars = _bars([100.0] * 6)
    cfg = BacktestConfig(fee_bps=10, slippage_bps=5)
    path = simulate(bars, np.array([1.0, -1.0, -1.0, 0.0, 0.0, 0.0]), cfg)
    np.testing.assert_allclose(path["cost"].to_numpy(), [0.0015, 0.0030, 0.0, 0.0015])
    assert path["equity"][-1] == pytest.approx(np.prod(1 - path["cost"].to_numpy()))


def test_buy_and_hold_earns_the_open_to_open_move_less_one_entry_cost():
    rng = np.random.default_rng(0)
    opens = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 300)))
    frame = _bars(opens).with_columns(
        symbol=pl.lit("X"), model_p_down=pl.lit(0.2), model_p_up=pl.lit(0.5)
    )
    cfg = BacktestConfig(fee_bps=10, slippage_bps=0)
    paths, metrics = run_backtest(frame, cfg)
    bh = metrics.filter(pl.col("strategy") == "buy_and_hold")
    first = opens[2] / opens[1] - 0.001  # the entry cost comes off the first bar's return
    assert bh["total_return"][0] == pytest.approx(first * opens[-1] / opens[2] - 1)
    assert set(metrics["strategy"]) == {"model", "buy_and_hold", "momentum"}
    assert metrics["periods_per_year"][0] == 365
    # the model rule here is always long (p_up - p_down = 0.3 > 0.1): same as buy-and-hold
    model = metrics.filter(pl.col("strategy") == "model")
    assert model["total_return"][0] == pytest.approx(bh["total_return"][0])


def test_performance_figures():
    path = pl.DataFrame(
        {
            "position": [1.0, 1.0, 0.0, 1.0],
            "gross_return": [0.1, -0.5, 0.0, 0.2],
            "net_return": [0.1, -0.5, 0.0, 0.2],
        }
    ).with_columns(equity=(1 + pl.col("net_return")).cum_prod())
    perf = performance(path, ppy=252)
    assert perf["max_drawdown"] == pytest.approx(-0.5)
    assert perf["hit_rate"] == pytest.approx(2 / 3)
    assert perf["exposure"] == pytest.approx(0.75)
    assert perf["total_return"] == pytest.approx(1.1 * 0.5 * 1.2 - 1)


def test_stock_calendar_annualizes_with_252():
    start = datetime(2021, 1, 4)  # a Monday
    days = [start + timedelta(days=i) for i in range(60)]
    days = [d for d in days if d.weekday() < 5]
    frame = pl.DataFrame(
        {
            "symbol": "S",
            "ts": days,
            "open": np.linspace(10, 12, len(days)),
            "close": np.linspace(10, 12, len(days)),
            "model_p_down": 0.3,
            "model_p_up": 0.3,
        }
    )
    _, metrics = run_backtest(frame, BacktestConfig())
    assert metrics["periods_per_year"][0] == 252


def test_bad_costs_are_refused():
    with pytest.raises(ValueError, match="fee_bps"):
        BacktestConfig(fee_bps=-1)
