"""Turn direction probabilities into positions and after-cost results.

Timing: a forecast made at the close of bar t sets the position entered at the open of bar t+1;
that position earns the open-to-open return from t+1 to t+2. Costs are charged on every change
of position at the price it is executed at.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass(frozen=True)
class BacktestConfig:
    threshold: float = 0.10  # |p_up - p_down| needed to take a position
    allow_short: bool = True
    fee_bps: float = 10.0
    slippage_bps: float = 5.0
    momentum_window: int = 90

    def __post_init__(self) -> None:
        if self.fee_bps < 0 or self.slippage_bps < 0:
            raise ValueError("fee_bps and slippage_bps must be >= 0")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")


def periods_per_year(ts: pl.Series) -> int:
    """365 for markets that trade every day (crypto), 252 for business-day calendars."""
    weekend = ts.dt.weekday().is_in([6, 7]).any()
    return 365 if weekend else 252


def positions_from_probabilities(
    p_down: np.ndarray, p_up: np.ndarray, cfg: BacktestConfig
) -> np.ndarray:
    score = p_up - p_down
    pos = np.where(score > cfg.threshold, 1.0, 0.0)
    if cfg.allow_short:
        pos = np.where(score < -cfg.threshold, -1.0, pos)
    return pos


def simulate(bars: pl.DataFrame, decided: np.ndarray, cfg: BacktestConfig) -> pl.DataFrame:
    """Equity path for positions `decided` at each bar's close (one symbol, bars in time order).

    Returns per bar: the position held over the next open-to-open interval, gross and net return,
    cost and equity. The last bar's decision has no next open to trade at and is dropped.
    """
    open_ = bars["open"].to_numpy()
    n = len(open_)
    if n < 3:
        raise ValueError(f"Backtest needs at least 3 bars, got {n}")
    held = decided[:-2]  # decided at t, held from open t+1 to open t+2
    fwd = open_[2:] / open_[1:-1] - 1.0
    prev = np.concatenate([[0.0], held[:-1]])
    cost = np.abs(held - prev) * (cfg.fee_bps + cfg.slippage_bps) / 1e4
    net = held * fwd - cost
    return pl.DataFrame(
        {
            "ts": bars["ts"][1:-1],  # the bar at whose open the position is entered
            "position": held,
            "gross_return": held * fwd,
            "cost": cost,
            "net_return": net,
            "equity": np.cumprod(1.0 + net),
        }
    )


def performance(path: pl.DataFrame, ppy: int) -> dict[str, float]:
    r = path["net_return"].to_numpy()
    equity = path["equity"].to_numpy()
    years = len(r) / ppy
    downside = r[r < 0]
    sd = r.std(ddof=1) if len(r) > 1 else 0.0
    dsd = np.sqrt(np.mean(downside**2)) if downside.size else 0.0
    peak = np.maximum.accumulate(np.concatenate([[1.0], equity]))[1:]
    pos = path["position"].to_numpy()
    active = pos != 0
    return {
        "total_return": float(equity[-1] - 1.0),
        "cagr": float(equity[-1] ** (1 / years) - 1.0)
        if years > 0 and equity[-1] > 0
        else float("nan"),
        "sharpe": float(r.mean() / sd * np.sqrt(ppy)) if sd > 0 else 0.0,
        "sortino": float(r.mean() / dsd * np.sqrt(ppy)) if dsd > 0 else 0.0,
        "max_drawdown": float(np.min(equity / peak - 1.0)),
        "turnover_per_year": float(np.abs(np.diff(np.concatenate([[0.0], pos]))).sum() / years)
        if years > 0
        else 0.0,
        "hit_rate": float(np.mean(path["gross_return"].to_numpy()[active] > 0))
        if active.any()
        else 0.0,
        "exposure": float(np.mean(active)),
        "bars": float(len(r)),
    }


def momentum_positions(log_close: np.ndarray, window: int, allow_short: bool) -> np.ndarray:
    past = np.full_like(log_close, np.nan)
    past[window:] = log_close[window:] - log_close[:-window]
    pos = np.where(past > 0, 1.0, 0.0)
    if allow_short:
        pos = np.where(past < 0, -1.0, pos)
    return np.nan_to_num(pos)


def run_backtest(
    frame: pl.DataFrame, cfg: BacktestConfig, forecasters: tuple[str, ...] = ("model",)
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Backtest each forecaster, buy-and-hold and momentum on the same bars, per symbol.

    frame: symbol, ts, open, close and `<forecaster>_p_down`, `<forecaster>_p_up` for each
    forecaster (rows of the out-of-sample period only).
    Returns (equity paths in long form, metrics per symbol and strategy).
    """
    paths, rows = [], []
    for (symbol,), bars in frame.sort(["symbol", "ts"]).group_by("symbol", maintain_order=True):
        ppy = periods_per_year(bars["ts"])
        log_close = np.log(bars["close"].to_numpy())
        strategies = {
            name: positions_from_probabilities(
                bars[f"{name}_p_down"].to_numpy(), bars[f"{name}_p_up"].to_numpy(), cfg
            )
            for name in forecasters
        }
        strategies["buy_and_hold"] = np.ones(bars.height)
        strategies["momentum"] = momentum_positions(log_close, cfg.momentum_window, cfg.allow_short)
        for name, decided in strategies.items():
            path = simulate(bars, decided, cfg)
            paths.append(path.with_columns(symbol=pl.lit(symbol), strategy=pl.lit(name)))
            rows.append(
                {
                    "symbol": symbol,
                    "strategy": name,
                    "periods_per_year": ppy,
                    **performance(path, ppy),
                }
            )
    return pl.concat(paths), pl.DataFrame(rows)


def plot_equity(paths: pl.DataFrame, title: str):
    """A matplotlib figure with one panel per symbol; the caller saves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    symbols = paths["symbol"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(len(symbols), 1, figsize=(9, 2.8 * len(symbols)), squeeze=False)
    for ax, symbol in zip(axes[:, 0], symbols, strict=True):
        for (strategy,), p in paths.filter(pl.col("symbol") == symbol).group_by(
            "strategy", maintain_order=True
        ):
            ax.plot(p["ts"].to_list(), p["equity"].to_numpy(), label=strategy, lw=1.2)
        ax.set_title(symbol)
        ax.set_ylabel("equity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
