"""Vectorized backtests: direction probabilities to positions, after-cost paths and metrics.

One call evaluates many parameter sets on one price series at once; every per-bar array is
shaped (n_params, n_bars) and no step loops over bars.

Timing. A decision made at the close of bar t (from the forecast of bar t) is executed at the
open of bar t+1, and the position earns the open-to-open return from t+1 to t+2. With n bars
there are n - 2 such intervals; the decision at the last bar's close (and the one before, whose
interval would need the open after the last) has nothing left to trade and is dropped.

Positions. score = p_up - p_down; long where score > threshold, short where score < -threshold
(only if allow_short), flat otherwise. With a holding period h, decisions are taken only every
h bars counted from the first bar of the series (bars 0, h, 2h, ...), and the position set at a
decision bar, direction and size, is held for the next h intervals: with h = 90 the strategy
trades at most once per 90-bar forecast horizon, on non-overlapping forecasts. With
volatility targeting, size = min(vol_target / (sigma * sqrt(periods_per_year)), max_leverage),
sigma being the per-bar return std forecast made at the decision bar; a bar without a usable
sigma forecast (missing, NaN or <= 0) takes no position.

Costs. fee_bps + slippage_bps per unit of position traded (position being a fraction of
equity), charged on every trade, including the entry from flat at the first open and the exit
to flat at the last open: the position still held at the end is closed there and pays its cost.
What is traded at an open is the distance from the weight the position has drifted to (the
previous weight after its interval's return, w (1 + r) / (1 + w r)) to the target weight, so
keeping a short, levered or vol-targeted weight pays for its rebalancing; a unit long drifts to
exactly 1 and pays nothing while held. A cost is deducted from the return of the interval its
trade opens (the exit's, |w| (1 + r) of that interval's starting equity, from the last
interval): net = position * open-to-open return - cost. Equity compounds the net returns and
stays at 0 once a (leveraged) loss has wiped it out.

Statistics. Sharpe = mean / std (ddof 1) of the per-interval net returns, Sortino = mean /
sqrt(mean(min(r, 0)^2)), both times sqrt(periods_per_year): 365 for markets that trade every
day (crypto), 252 for business-day calendars. The deflated Sharpe ratio (Bailey and Lopez de
Prado, 2014) says how likely the best Sharpe of a grid is to be real, given how many parameter
sets were tried.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
from scipy.stats import norm

EULER_GAMMA = 0.5772156649015329
# part of every backtest artifact's version: bump when the engine computes anything differently
BACKTEST_CODE_VERSION = "2"

PARAM_COLUMNS = (
    "threshold",
    "allow_short",
    "holding_period",
    "vol_target",
    "max_leverage",
    "fee_bps",
    "slippage_bps",
)
PARAM_SCHEMA = {
    "param_id": pl.Int64,
    "threshold": pl.Float64,
    "allow_short": pl.Boolean,
    "holding_period": pl.Int64,
    "vol_target": pl.Float64,  # null: no volatility targeting (unit size)
    "max_leverage": pl.Float64,
    "fee_bps": pl.Float64,
    "slippage_bps": pl.Float64,
}
METRIC_COLUMNS = (
    "total_return",
    "cagr",
    "sharpe",
    "sortino",
    "max_drawdown",
    "turnover_per_year",
    "hit_rate",
    "exposure",
)
BASELINES = ("buy_and_hold", "momentum")


@dataclass(frozen=True)
class BacktestConfig:
    """The default parameter set (the headline) and the rules shared by every strategy."""

    threshold: float = 0.10  # p_up - p_down beyond +-threshold takes a position
    allow_short: bool = True
    fee_bps: float = 10.0
    slippage_bps: float = 5.0
    momentum_window: int = 90  # bars of trailing return the momentum baseline looks at
    holding_period: int = 1  # bars a position is held; decisions every holding_period bars
    vol_target: float | None = None  # annualized; None: unit positions
    max_leverage: float = 2.0  # cap on the vol-targeted size
    vol_window: int = 30  # bars of the trailing-std sigma used when no sigma forecast is given

    def __post_init__(self) -> None:
        check_params(self.params())
        for name in ("momentum_window", "vol_window"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def params(self) -> pl.DataFrame:
        """This configuration as a one-row parameter table (param_id 0)."""
        fields = asdict(self)
        return pl.DataFrame(
            [{"param_id": 0, **{c: fields[c] for c in PARAM_COLUMNS}}], schema=PARAM_SCHEMA
        )


def check_params(params: pl.DataFrame) -> None:
    """Raise ValueError naming the column and the offending values of a bad parameter table."""
    missing = [c for c in ("param_id", *PARAM_COLUMNS) if c not in params.columns]
    if missing:
        raise ValueError(
            f"parameter table lacks columns {missing}; build it with parameter_grid() "
            "or BacktestConfig.params()"
        )
    if params.height == 0:
        raise ValueError("parameter table is empty; give at least one parameter set")
    rules = {
        "threshold": ((pl.col("threshold") >= 0) & (pl.col("threshold") < 1), "in [0, 1)"),
        "holding_period": (pl.col("holding_period") >= 1, "an integer >= 1"),
        "vol_target": (pl.col("vol_target").is_null() | (pl.col("vol_target") > 0), "> 0 or None"),
        "max_leverage": (pl.col("max_leverage") > 0, "> 0"),
        "fee_bps": (pl.col("fee_bps") >= 0, ">= 0"),
        "slippage_bps": (pl.col("slippage_bps") >= 0, ">= 0"),
    }
    for column, (ok, rule) in rules.items():
        bad = params.filter(~ok.fill_null(False))[column].to_list()
        if bad:
            raise ValueError(f"{column} must be {rule}, got {bad[:5]}")
    nulls = [c for c in PARAM_COLUMNS if c != "vol_target" and params[c].null_count()]
    if nulls:
        raise ValueError(f"parameter columns {nulls} hold nulls; give every set a value")
    if params["param_id"].n_unique() != params.height:
        raise ValueError("param_id values repeat; give each parameter set its own id")


def parameter_grid(
    thresholds: Sequence[float] = (0.10,),
    allow_short: Sequence[bool] = (True,),
    holding_periods: Sequence[int] = (1,),
    vol_targets: Sequence[float | None] = (None,),
    costs_bps: Sequence[tuple[float, float]] = ((10.0, 5.0),),
    max_leverages: Sequence[float] = (2.0,),
) -> pl.DataFrame:
    """Every combination of the given values as a parameter table, one row per set.

    costs_bps holds (fee_bps, slippage_bps) pairs; a vol target of None means unit positions.
    Returns columns param_id (0..n-1, in itertools.product order) and PARAM_COLUMNS.
    """
    rows = [
        {
            "param_id": i,
            "threshold": thr,
            "allow_short": short,
            "holding_period": hold,
            "vol_target": vt,
            "max_leverage": lev,
            "fee_bps": fee,
            "slippage_bps": slip,
        }
        for i, (thr, short, hold, vt, (fee, slip), lev) in enumerate(
            itertools.product(
                thresholds, allow_short, holding_periods, vol_targets, costs_bps, max_leverages
            )
        )
    ]
    grid = pl.DataFrame(rows, schema=PARAM_SCHEMA)
    check_params(grid)
    return grid


def periods_per_year(ts: pl.Series) -> int:
    """365 for markets that trade every day (crypto), 252 for business-day calendars."""
    weekend = ts.dt.weekday().is_in([6, 7]).any()
    return 365 if weekend else 252


def _param_arrays(params: pl.DataFrame) -> dict[str, np.ndarray]:
    check_params(params)
    return {
        "threshold": params["threshold"].to_numpy(),
        "allow_short": params["allow_short"].to_numpy(),
        "holding_period": params["holding_period"].to_numpy().astype(np.int64),
        "vol_target": params["vol_target"].fill_null(np.nan).to_numpy(),
        "max_leverage": params["max_leverage"].to_numpy(),
        "cost": (params["fee_bps"] + params["slippage_bps"]).to_numpy() / 1e4,
    }


def hold_decisions(decided: np.ndarray, holding_period: np.ndarray) -> np.ndarray:
    """(n_params, n_bars) decisions where row i only changes every holding_period[i] bars.

    Bar t carries the decision of bar (t // h) * h: the decision bars are 0, h, 2h, ...
    """
    hold = np.asarray(holding_period, dtype=np.int64)
    if (hold == 1).all():
        return decided
    t = np.arange(decided.shape[1])
    source = (t[None, :] // hold[:, None]) * hold[:, None]
    return np.take_along_axis(decided, source, axis=1)


def positions_from_probabilities(
    p_down: np.ndarray,
    p_up: np.ndarray,
    params: pl.DataFrame,
    ppy: int,
    sigma: np.ndarray | None = None,
) -> np.ndarray:
    """Positions decided at each bar's close, shaped (n_params, n_bars), one row per set.

    Direction from p_up - p_down against the set's threshold (a NaN probability is flat), size
    1 or vol-targeted from `sigma` (per-bar return std forecasts, needed when any set has a vol
    target), then held for the set's holding period (see the module docstring).
    """
    p = _param_arrays(params)
    score = np.asarray(p_up, dtype=float) - np.asarray(p_down, dtype=float)
    thr = p["threshold"][:, None]
    direction = (score[None, :] > thr).astype(float)
    direction -= (score[None, :] < -thr) & p["allow_short"][:, None]
    sized = np.isfinite(p["vol_target"])
    if sized.any():
        if sigma is None:
            raise ValueError(
                "parameter sets with a vol_target need a sigma forecast: pass sigma "
                "(per-bar return std at each bar) or set vol_target to None"
            )
        sigma = np.asarray(sigma, dtype=float)
        usable = np.isfinite(sigma) & (sigma > 0)
        per_year = np.where(usable, sigma, np.nan) * np.sqrt(ppy)
        size = np.minimum(
            p["vol_target"][sized, None] / per_year[None, :], p["max_leverage"][sized, None]
        )
        direction[sized] *= np.nan_to_num(size, nan=0.0)
    return hold_decisions(direction, p["holding_period"])


def momentum_positions(close: np.ndarray, window: int, allow_short: bool) -> np.ndarray:
    """Sign of the trailing `window`-bar return at each close (backward-looking only).

    Long when close[t] > close[t - window], short (or flat if not allow_short) when below, flat
    for the first `window` bars, which have no such return yet.
    """
    log_close = np.log(np.asarray(close, dtype=float))
    past = np.full_like(log_close, np.nan)
    past[window:] = log_close[window:] - log_close[:-window]
    pos = (past > 0).astype(float)
    if allow_short:
        pos -= past < 0
    return pos


def trailing_sigma(close: np.ndarray, window: int) -> np.ndarray:
    """Std (ddof 1) of the last `window` one-bar log returns known at each close; NaN before
    `window` returns exist. The sigma forecast used when a forecaster gives none."""
    r = np.diff(np.log(np.asarray(close, dtype=float)))
    out = np.full(len(r) + 1, np.nan)
    if len(r) >= window:
        out[window:] = np.lib.stride_tricks.sliding_window_view(r, window).std(axis=1, ddof=1)
    return out


@dataclass(frozen=True)
class Simulation:
    """After-cost paths, each (n_params, n_bars - 2): row i is parameter set i, column k the
    interval from the open of bar k+1 to the open of bar k+2."""

    position: np.ndarray
    gross_return: np.ndarray
    cost: np.ndarray
    net_return: np.ndarray
    equity: np.ndarray
    drawdown: np.ndarray
    turnover: np.ndarray  # (n_params,) total |position change|, entry and final exit included


def _drifted(held: np.ndarray, fwd: np.ndarray) -> np.ndarray:
    """The weight each interval starts from before trading: the previous interval's weight
    after its return moved the position and the equity, w (1 + r) / (1 + w r); 0 before the
    first interval and after a wipe-out. Trading from it to the target weight is what is
    charged, so holding a short, levered or vol-targeted weight pays for its rebalancing
    (a unit long drifts to exactly 1 and pays nothing)."""
    w, r = held[:, :-1], fwd[None, :-1]
    equity = 1.0 + w * r
    drift = np.where(equity > 0, w * (1.0 + r) / np.where(equity > 0, equity, 1.0), 0.0)
    return np.concatenate([np.zeros((held.shape[0], 1)), drift], axis=1)


def simulate(open_: np.ndarray, decided: np.ndarray, cost: np.ndarray | float) -> Simulation:
    """Execute decisions (n_params, n_bars) at the next open; cost is per unit of position
    changed, as a fraction ((fee_bps + slippage_bps) / 1e4), per set or one for all."""
    open_ = np.asarray(open_, dtype=float)
    decided = np.atleast_2d(np.asarray(decided, dtype=float))
    n = len(open_)
    if n < 3:
        raise ValueError(f"a backtest needs at least 3 bars (2 opens after a decision), got {n}")
    if decided.shape[1] != n:
        raise ValueError(f"decisions have {decided.shape[1]} bars but open_ has {n}")
    rate = np.broadcast_to(np.asarray(cost, dtype=float), (decided.shape[0],))[:, None]
    held = decided[:, :-2]
    fwd = open_[2:] / open_[1:-1] - 1.0
    gross = held * fwd
    change = np.abs(held - _drifted(held, fwd))
    # the position left at the end is closed at the last open: |w| (1 + r) of the last
    # interval's starting equity, the value the position has grown (or shrunk) to
    change[:, -1] += np.abs(held[:, -1]) * (1.0 + fwd[-1])
    cost_path = change * rate
    net = gross - cost_path
    equity = np.cumprod(np.maximum(1.0 + net, 0.0), axis=1)
    # once a (leveraged) loss has wiped the account out there is nothing left to earn or lose:
    # later intervals count as 0, so Sharpe, skew and hit rate see no returns of a dead account
    alive = np.concatenate([np.ones((equity.shape[0], 1)), equity[:, :-1]], axis=1) > 0
    net = np.where(alive, net, 0.0)
    gross = np.where(alive, gross, 0.0)
    cost_path = np.where(alive, cost_path, 0.0)
    peak = np.maximum(np.maximum.accumulate(equity, axis=1), 1.0)
    return Simulation(
        position=held,
        gross_return=gross,
        cost=cost_path,
        net_return=net,
        equity=equity,
        drawdown=equity / peak - 1.0,
        turnover=change.sum(axis=1),
    )


def performance(sim: Simulation, ppy: int) -> dict[str, np.ndarray]:
    """Metrics per parameter set, each an array of n_params values.

    METRIC_COLUMNS (annualized with ppy periods per year; cagr is -1 once equity is gone;
    sharpe and sortino are 0 where the std or downside deviation is 0; hit_rate is the share of
    in-market intervals with a positive gross return; exposure the share of intervals in the
    market) plus the inputs of the deflated Sharpe ratio: sharpe_per_bar (not annualized),
    skewness, kurtosis (Pearson: 3 for a normal) and bars (intervals).
    """
    r = sim.net_return
    m = r.shape[1]
    years = m / ppy
    mean = r.mean(axis=1)
    dev = r - mean[:, None]
    m2 = np.mean(dev**2, axis=1)
    sd = np.sqrt(m2 * m / (m - 1)) if m > 1 else np.zeros_like(mean)
    downside = np.sqrt(np.mean(np.minimum(r, 0.0) ** 2, axis=1))
    final = sim.equity[:, -1]
    active = sim.position != 0
    n_active = active.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sr_bar = np.where(sd > 0, mean / sd, 0.0)
        skew = np.where(m2 > 0, np.mean(dev**3, axis=1) / m2**1.5, 0.0)
        kurt = np.where(m2 > 0, np.mean(dev**4, axis=1) / m2**2, 3.0)
        sortino = np.where(downside > 0, mean / downside, 0.0) * np.sqrt(ppy)
        hit = np.where(n_active > 0, ((sim.gross_return > 0) & active).sum(axis=1) / n_active, 0)
    return {
        "total_return": final - 1.0,
        "cagr": np.where(final > 0, np.maximum(final, 1e-300) ** (1.0 / years) - 1.0, -1.0),
        "sharpe": sr_bar * np.sqrt(ppy),
        "sortino": sortino,
        "max_drawdown": sim.drawdown.min(axis=1),
        "turnover_per_year": sim.turnover / years,
        "hit_rate": hit.astype(float),
        "exposure": active.mean(axis=1),
        "sharpe_per_bar": sr_bar,
        "skewness": skew,
        "kurtosis": kurt,
        "bars": np.full(len(mean), float(m)),
    }


def expected_max_sharpe(sharpe_variance: float, n_trials: int) -> float:
    """Expected maximum of n_trials independent Sharpe estimates whose true value is 0, given
    the variance of the trials' Sharpe ratios (Bailey and Lopez de Prado, 2014):
    sqrt(V) * ((1 - g) * Phi^-1(1 - 1/N) + g * Phi^-1(1 - 1/(N e))), g the Euler-Mascheroni
    constant; 0 for a single trial (nothing was selected). Same units as the Sharpe ratios."""
    if n_trials < 1:
        raise ValueError(f"n_trials must be >= 1, got {n_trials}")
    if sharpe_variance < 0:
        raise ValueError(f"sharpe_variance must be >= 0, got {sharpe_variance}")
    if n_trials == 1:
        return 0.0
    z = (1 - EULER_GAMMA) * norm.ppf(1 - 1 / n_trials) + EULER_GAMMA * norm.ppf(
        1 - 1 / (n_trials * np.e)
    )
    return float(np.sqrt(sharpe_variance) * z)


def deflated_sharpe_ratio(
    sharpe: float,
    sharpe_variance: float,
    n_trials: int,
    n_obs: int,
    skewness: float,
    kurtosis: float,
) -> float:
    """Probability that the true Sharpe ratio exceeds the expected maximum Sharpe of n_trials
    independent trials (Bailey and Lopez de Prado, 2014).

    sharpe and sharpe_variance (the variance of the trials' Sharpe ratios) are per period, not
    annualized; n_obs is the track length in periods; skewness and kurtosis (Pearson, 3 for a
    normal) are those of the selected strategy's returns. Returns
    Phi((SR - SR0) sqrt(T - 1) / sqrt(1 - skew SR + (kurt - 1) / 4 SR^2)) with SR0 =
    expected_max_sharpe(sharpe_variance, n_trials); with one trial it is the probabilistic
    Sharpe ratio against 0.
    """
    if n_obs < 2:
        raise ValueError(f"n_obs must be >= 2, got {n_obs}")
    sr0 = expected_max_sharpe(sharpe_variance, n_trials)
    denom = 1 - skewness * sharpe + (kurtosis - 1) / 4 * sharpe**2
    if denom <= 0:
        raise ValueError(
            f"1 - skewness*SR + (kurtosis-1)/4*SR^2 = {denom:.3g} <= 0: pass the per-period "
            "(not annualized) Sharpe ratio and Pearson (not excess) kurtosis"
        )
    return float(norm.cdf((sharpe - sr0) * np.sqrt(n_obs - 1) / np.sqrt(denom)))


def evaluate(
    open_: np.ndarray,
    p_down: np.ndarray,
    p_up: np.ndarray,
    params: pl.DataFrame,
    ppy: int,
    sigma: np.ndarray | None = None,
) -> tuple[Simulation, dict[str, np.ndarray]]:
    """Every parameter set on one series: (the simulation, performance per set)."""
    decided = positions_from_probabilities(p_down, p_up, params, ppy, sigma)
    sim = simulate(open_, decided, _param_arrays(params)["cost"])
    return sim, performance(sim, ppy)


def _path_frame(ts: pl.Series, sim: Simulation, row: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts": ts[1:-1],  # the bar at whose open the interval starts
            "position": sim.position[row],
            "gross_return": sim.gross_return[row],
            "cost": sim.cost[row],
            "net_return": sim.net_return[row],
            "equity": sim.equity[row],
            "drawdown": sim.drawdown[row],
        }
    )


def _sigma_for(bars: pl.DataFrame, name: str, cfg: BacktestConfig) -> np.ndarray:
    col = f"{name}_sigma"
    if col in bars.columns:
        return bars[col].cast(pl.Float64).fill_null(np.nan).to_numpy()
    return trailing_sigma(bars["close"].to_numpy(), cfg.vol_window)


def _baseline_positions(bars: pl.DataFrame, cfg: BacktestConfig) -> dict[str, np.ndarray]:
    """Buy-and-hold, and momentum: from `log_ret_<window>` when the frame has it (the trailing
    return over the whole history, so momentum trades from the first bar, like the models),
    else from the frame's own closes (flat for the first `window` bars)."""
    trailing = f"log_ret_{cfg.momentum_window}"
    if trailing in bars.columns:
        past = bars[trailing].cast(pl.Float64).fill_null(np.nan).to_numpy()
        momentum = (past > 0).astype(float) - ((past < 0) & cfg.allow_short)
    else:
        momentum = momentum_positions(
            bars["close"].to_numpy(), cfg.momentum_window, cfg.allow_short
        )
    return {"buy_and_hold": np.ones(bars.height), "momentum": momentum}


def _symbols(frame: pl.DataFrame):
    return frame.sort(["symbol", "ts"]).group_by("symbol", maintain_order=True)


def run_backtest(
    frame: pl.DataFrame, cfg: BacktestConfig, forecasters: tuple[str, ...] = ("model",)
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Backtest the default parameter set `cfg` for each forecaster, with buy-and-hold and
    momentum on the same bars and costs, per symbol.

    frame: symbol, ts, open, close and `<forecaster>_p_down`, `<forecaster>_p_up` per
    forecaster (out-of-sample rows only); `<forecaster>_sigma` (per-bar return std forecast)
    is used for vol targeting where present, else the trailing cfg.vol_window-bar std.
    Returns (paths: symbol, strategy, ts, position, gross_return, cost, net_return, equity,
    drawdown; metrics: symbol, strategy, periods_per_year, METRIC_COLUMNS, bars).
    """
    params = cfg.params()
    cost = (cfg.fee_bps + cfg.slippage_bps) / 1e4
    paths, rows = [], []
    for (symbol,), bars in _symbols(frame):
        ppy = periods_per_year(bars["ts"])
        decided = {
            name: positions_from_probabilities(
                bars[f"{name}_p_down"].to_numpy(),
                bars[f"{name}_p_up"].to_numpy(),
                params,
                ppy,
                _sigma_for(bars, name, cfg) if cfg.vol_target is not None else None,
            )[0]
            for name in forecasters
        } | _baseline_positions(bars, cfg)
        open_ = bars["open"].to_numpy()
        for name, pos in decided.items():
            sim = simulate(open_, pos, cost)
            perf = performance(sim, ppy)
            paths.append(
                _path_frame(bars["ts"], sim, 0).select(
                    pl.lit(symbol).alias("symbol"), pl.lit(name).alias("strategy"), pl.all()
                )
            )
            rows.append(
                {
                    "symbol": symbol,
                    "strategy": name,
                    "periods_per_year": ppy,
                    **{k: float(perf[k][0]) for k in (*METRIC_COLUMNS, "bars")},
                }
            )
    return pl.concat(paths), pl.DataFrame(rows)


@dataclass(frozen=True)
class GridResult:
    """What run_grid found.

    params: the parameter table evaluated (the default set included, flagged is_default).
    metrics: one row per symbol, forecaster and parameter set: symbol, strategy, param_id,
      is_default, METRIC_COLUMNS, sharpe_per_bar, skewness, kurtosis, bars.
    baselines: buy-and-hold and momentum per symbol at each cost level of the grid.
    summary: one row per symbol and forecaster; the headline is the DEFAULT set (default_*
      columns); best_* is the best Sharpe among the sets at the default's cost level (n_trials
      of them; choosing the cheapest costs is no real choice), with its deflated Sharpe ratio
      given those n_trials and expected_max_sharpe, the Sharpe the best of n_trials worthless
      sets would reach by luck (annualized).
    """

    params: pl.DataFrame
    metrics: pl.DataFrame
    baselines: pl.DataFrame
    summary: pl.DataFrame


def _with_default(grid: pl.DataFrame, cfg: BacktestConfig) -> pl.DataFrame:
    check_params(grid)
    grid = grid.select(PARAM_SCHEMA.keys()).cast(PARAM_SCHEMA)
    default = cfg.params().drop("param_id").row(0)
    flags = [row == default for row in grid.drop("param_id").iter_rows()]
    if not any(flags):
        extra = cfg.params().with_columns(param_id=pl.lit(grid["param_id"].max() + 1, pl.Int64))
        grid = pl.concat([grid, extra])
        flags.append(True)
    first = flags.index(True)
    return grid.with_columns(is_default=pl.Series([i == first for i in range(len(flags))]))


def describe_params(row: dict) -> str:
    """One line naming a parameter set, e.g. 'threshold 0.1, long/short, hold 1, unit size,
    10+5 bps'."""
    size = (
        "unit size"
        if row["vol_target"] is None
        else f"vol target {row['vol_target']:g} (max {row['max_leverage']:g}x)"
    )
    side = "long/short" if row["allow_short"] else "long only"
    return (
        f"threshold {row['threshold']:g}, {side}, hold {row['holding_period']}, {size}, "
        f"{row['fee_bps']:g}+{row['slippage_bps']:g} bps"
    )


def run_grid(
    frame: pl.DataFrame,
    grid: pl.DataFrame,
    cfg: BacktestConfig,
    forecasters: tuple[str, ...] = ("model",),
) -> GridResult:
    """Evaluate every parameter set of `grid` (see parameter_grid) for each forecaster and
    symbol of `frame` (the input of run_backtest), all sets at once per series, with the
    baselines at each cost level and a summary headlined by the default set `cfg`, which is
    added to the grid if it is not in it."""
    params = _with_default(grid, cfg)
    p = params.drop("is_default")
    default_row = params.filter("is_default").row(0, named=True)
    sized = p["vol_target"].is_not_null().any()
    costs = p.select("fee_bps", "slippage_bps").unique(maintain_order=True)
    metric_frames, baseline_frames, summary = [], [], []
    for (symbol,), bars in _symbols(frame):
        ppy = periods_per_year(bars["ts"])
        open_ = bars["open"].to_numpy()
        base_perf = {}
        for name, pos in _baseline_positions(bars, cfg).items():
            rates = ((costs["fee_bps"] + costs["slippage_bps"]) / 1e4).to_numpy()
            perf = performance(simulate(open_, np.tile(pos, (costs.height, 1)), rates), ppy)
            base = costs.with_columns(
                symbol=pl.lit(symbol),
                strategy=pl.lit(name),
                **{k: pl.Series(perf[k]) for k in METRIC_COLUMNS},
            )
            baseline_frames.append(base)
            base_perf[name] = base.filter(
                (pl.col("fee_bps") == default_row["fee_bps"])
                & (pl.col("slippage_bps") == default_row["slippage_bps"])
            )["sharpe"][0]
        symbol_frames = []
        for name in forecasters:
            _, perf = evaluate(
                open_,
                bars[f"{name}_p_down"].to_numpy(),
                bars[f"{name}_p_up"].to_numpy(),
                p,
                ppy,
                _sigma_for(bars, name, cfg) if sized else None,
            )
            m = params.select("param_id", "is_default").with_columns(
                symbol=pl.lit(symbol),
                strategy=pl.lit(name),
                **{k: pl.Series(v) for k, v in perf.items()},
            )
            metric_frames.append(m)
            symbol_frames.append(m)
        # every (forecaster, parameter set) of the symbol is a trial a user could have picked,
        # so the best one is deflated by all of them, not by its own forecaster's sets only
        pool = _same_cost(pl.concat(symbol_frames), params, default_row)
        pooled = (
            pool.height,
            float(pool["sharpe_per_bar"].var(ddof=1)) if pool.height > 1 else 0.0,
        )
        summary.extend(
            _summarize(m, params, default_row, ppy, base_perf, pooled) for m in symbol_frames
        )
    keys = ("symbol", "strategy", "param_id", "is_default")
    metrics = pl.concat(metric_frames).select(*keys, pl.exclude(keys))
    baselines = pl.concat(baseline_frames).select(
        "symbol", "strategy", "fee_bps", "slippage_bps", *METRIC_COLUMNS
    )
    return GridResult(params, metrics, baselines, pl.DataFrame(summary))


def _same_cost(m: pl.DataFrame, params: pl.DataFrame, default_row: dict) -> pl.DataFrame:
    """The rows of `m` whose parameter set has the default's costs (the cost level is not a
    choice a strategy can make)."""
    same_cost = params.filter(
        (pl.col("fee_bps") == default_row["fee_bps"])
        & (pl.col("slippage_bps") == default_row["slippage_bps"])
    )["param_id"]
    return m.filter(pl.col("param_id").is_in(same_cost.implode()))


def _summarize(
    m: pl.DataFrame,
    params: pl.DataFrame,
    default_row: dict,
    ppy: int,
    base: dict,
    pooled: tuple[int, float],
) -> dict:
    """The summary row of one (symbol, forecaster): the default set's metrics, and the best
    set's Sharpe deflated by `pooled` = (number of trials, variance of their per-bar Sharpe
    ratios) over every forecaster's sets of the symbol."""
    trials = _same_cost(m, params, default_row)
    best = trials.sort(["sharpe", "param_id"], descending=[True, False]).row(0, named=True)
    default = m.filter("is_default").row(0, named=True)
    n_trials, variance = pooled
    best_params = params.filter(pl.col("param_id") == best["param_id"]).row(0, named=True)
    return {
        "symbol": default["symbol"],
        "strategy": default["strategy"],
        "default_param_id": default["param_id"],
        "default_params": describe_params(default_row),
        **{f"default_{k}": default[k] for k in METRIC_COLUMNS},
        "buy_and_hold_sharpe": base["buy_and_hold"],
        "momentum_sharpe": base["momentum"],
        "n_trials": n_trials,
        "best_param_id": best["param_id"],
        "best_params": describe_params(best_params),
        "best_sharpe": best["sharpe"],
        "expected_max_sharpe": expected_max_sharpe(variance, n_trials) * np.sqrt(ppy),
        "best_deflated_sharpe": deflated_sharpe_ratio(
            best["sharpe_per_bar"],
            variance,
            n_trials,
            int(best["bars"]),
            best["skewness"],
            best["kurtosis"],
        ),
    }


def plot_equity(paths: pl.DataFrame, title: str):
    """A matplotlib figure (Agg, not registered with pyplot; the caller saves it): per symbol an
    equity panel (log scale) over a drawdown panel, one line per strategy."""
    from matplotlib.figure import Figure

    symbols = paths["symbol"].unique(maintain_order=True).to_list()
    fig = Figure(figsize=(9, 4.2 * len(symbols)))
    axes = fig.subplots(2 * len(symbols), 1, squeeze=False, height_ratios=[2, 1] * len(symbols))
    for i, symbol in enumerate(symbols):
        ax_eq, ax_dd = axes[2 * i, 0], axes[2 * i + 1, 0]
        ax_dd.sharex(ax_eq)
        for (strategy,), p in paths.filter(pl.col("symbol") == symbol).group_by(
            "strategy", maintain_order=True
        ):
            ts = p["ts"].to_list()
            equity = p["equity"].to_numpy()
            drawdown = (
                p["drawdown"].to_numpy()
                if "drawdown" in p.columns
                else equity / np.maximum(np.maximum.accumulate(equity), 1.0) - 1.0
            )
            ax_eq.plot(ts, equity, label=strategy, lw=1.2)
            ax_dd.plot(ts, 100 * drawdown, label=strategy, lw=1.0)
        ax_eq.set_title(symbol)
        ax_eq.set_ylabel("equity")
        ax_eq.set_yscale("log")
        ax_eq.legend(loc="upper left", fontsize=8)
        ax_dd.set_ylabel("drawdown %")
        for ax in (ax_eq, ax_dd):
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
