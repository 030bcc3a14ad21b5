"""A seeded synthetic market: the embedded default, so a fresh machine runs everything offline.

One path per seed is generated over a fixed horizon and sliced, so fetching any window gives the
same rows as fetching a larger window and cutting it: partitions and backfills agree.

Stylized facts built in: GARCH(1,1) volatility clustering, Student-t (fat-tailed) shocks, a
Markov regime (bull / bear / range) that makes trends, stocks on a business-day calendar with
overnight gaps and a shared market factor, on-chain activity and hash rate coupled to price with
difficulty retargeting every 14 days, and macro series published one day after observation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import numpy as np
import polars as pl

from warehouse.sources.base import SourceError, check_entities, check_timeframe, register

ORIGIN = date(2012, 1, 1)
HORIZON_END = date(2041, 1, 1)  # exclusive
RETARGET_DAYS = 14


@dataclass(frozen=True)
class SymbolSpec:
    kind: str  # "crypto" (every day) or "stock" (business days)
    start_price: float
    daily_vol: float
    beta: float = 0.0  # loading on the shared stock-market factor


SYMBOLS: dict[str, SymbolSpec] = {
    "BTC-USD": SymbolSpec("crypto", 120.0, 0.035),
    "ACME": SymbolSpec("stock", 40.0, 0.012, beta=1.1),
    "GLBX": SymbolSpec("stock", 85.0, 0.010, beta=0.7),
}
ONCHAIN_ASSETS = ("BTC",)
MACRO_SERIES = ("DTWEXBGS", "DGS10", "DGS2", "T10Y2Y")
_STREAM = {"macro": 1, "market": 2, "onchain": 3, "BTC-USD": 10, "ACME": 11, "GLBX": 12}


def check_symbols(
    symbols: str | tuple[str, ...] | list[str], known: tuple[str, ...] | list[str], what: str
) -> tuple[str, ...]:
    """`symbols` as a tuple, each one of the `known` entities this market generates."""
    return check_entities(
        symbols,
        source="synthetic",
        what=what,
        hint=f"choose from {list(known)}",
        valid=lambda s: s in known,
        invalid=lambda unknown: (
            f"Unknown {what} {unknown} for source 'synthetic'; it generates "
            f"{list(known)}. Pick from those or configure another source."
        ),
    )


class SyntheticMarket:
    """Deterministic for a seed: the same seed always gives the same history."""

    def __init__(self, seed: int = 42) -> None:
        if not isinstance(seed, int) or seed < 0:
            raise SourceError(f"Synthetic seed must be a non-negative integer, got {seed!r}")
        self.seed = seed

    def _rng(self, stream: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, _STREAM[stream]])

    # -- calendars -------------------------------------------------------------------------
    @staticmethod
    def _days() -> np.ndarray:
        return np.arange(np.datetime64(ORIGIN), np.datetime64(HORIZON_END), dtype="datetime64[D]")

    @staticmethod
    def _business_days() -> np.ndarray:
        days = SyntheticMarket._days()
        return days[np.is_busday(days)]

    # -- macro -----------------------------------------------------------------------------
    @functools.cached_property
    def macro(self) -> pl.DataFrame:
        rng = self._rng("macro")
        days = self._business_days()
        n = len(days)
        dxy = _ou(rng, n, x0=95.0, mean=100.0, kappa=0.004, sigma=0.35)
        ten = np.maximum(_ou(rng, n, x0=2.0, mean=3.0, kappa=0.003, sigma=0.055), 0.2)
        spread_target = _ou(rng, n, x0=1.5, mean=0.8, kappa=0.004, sigma=0.03)
        two = np.maximum(ten - spread_target, 0.05)
        ten, two, dxy = np.round(ten, 2), np.round(two, 2), np.round(dxy, 4)
        values = {"DTWEXBGS": dxy, "DGS10": ten, "DGS2": two, "T10Y2Y": np.round(ten - two, 2)}
        dates = pl.Series("date", days.astype("datetime64[D]")).cast(pl.Date)
        frames = [
            pl.DataFrame({"series": name, "date": dates, "value": v}) for name, v in values.items()
        ]
        return pl.concat(frames).with_columns(published=pl.col("date") + pl.duration(days=1))

    # -- prices ----------------------------------------------------------------------------
    @functools.cached_property
    def _stock_market_factor(self) -> np.ndarray:
        rng = self._rng("market")
        n = len(self._business_days())
        regime_drift = np.array([0.0006, -0.0008, 0.0001])
        regime_vol = np.array([0.85, 1.5, 0.8])
        reg = _markov_regimes(rng, n, stay=1 - 1 / 150)
        return _garch_returns(rng, n, 0.009, regime_drift[reg], regime_vol[reg], df=5.0)

    @functools.cache  # noqa: B019 (one market object per seed; the cache lives with it)
    def ohlcv(self, symbol: str) -> pl.DataFrame:
        spec = SYMBOLS[symbol]
        rng = self._rng(symbol)
        if spec.kind == "crypto":
            days = self._days()
            n = len(days)
            reg = _markov_regimes(rng, n, stay=1 - 1 / 120)
            drift = np.array([0.0030, -0.0025, 0.0002])[reg]
            vol_mult = np.array([0.9, 1.35, 0.65])[reg]
            # The dollar index as it was known on each day (published one day after observation)
            # weighs on crypto: a real, lagged cross-asset effect for features to find.
            dxy = self._dxy_known_on(days)
            dxy_change = np.concatenate([[0.0], np.diff(np.log(dxy))])
            drift = drift - 0.8 * dxy_change
            ret = _garch_returns(rng, n, spec.daily_vol, drift, vol_mult, df=4.0)
            gap = np.zeros(n)  # trades around the clock: each bar opens at the previous close
        else:
            days = self._business_days()
            n = len(days)
            idio = _garch_returns(rng, n, spec.daily_vol, np.full(n, 0.0001), np.ones(n), df=5.0)
            ret = spec.beta * self._stock_market_factor + idio
            gap = ret * rng.uniform(0.1, 0.4, n)  # part of each day's move happens overnight
        close = spec.start_price * np.exp(np.cumsum(ret))
        prev_close = np.concatenate([[spec.start_price], close[:-1]])
        open_ = prev_close * np.exp(gap)
        sigma = np.sqrt(_ewma_var(ret, 0.94, spec.daily_vol**2))
        high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0, 0.6, n)) * sigma)
        low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0, 0.6, n)) * sigma)
        trend = np.log(close) - np.log(spec.start_price)
        log_vol = (
            np.log(1e4 if spec.kind == "crypto" else 2e6)
            + 0.25 * trend
            + 8.0 * np.abs(ret)
            + _ar1(rng, n, 0.7, 0.25)
        )
        return pl.DataFrame(
            {
                "symbol": symbol,
                "ts": pl.Series(days.astype("datetime64[us]")),
                "open": open_,
                "high": high,
                "low": low,
                "close": close,
                "volume": np.exp(log_vol),
            }
        )

    def _dxy_known_on(self, days: np.ndarray) -> np.ndarray:
        m = self.macro.filter(pl.col("series") == "DTWEXBGS").sort("published")
        known = pl.DataFrame({"day": pl.Series(days).cast(pl.Date)}).join_asof(
            m.select(day=pl.col("published"), value="value"), on="day", strategy="backward"
        )
        return known["value"].fill_null(strategy="backward").to_numpy()

    # -- on-chain --------------------------------------------------------------------------
    @functools.cached_property
    def onchain(self) -> pl.DataFrame:
        rng = self._rng("onchain")
        px = self.ohlcv("BTC-USD")
        close = px["close"].to_numpy()
        ret = np.diff(np.log(close), prepend=np.log(close[0]))
        n = len(close)
        log_px = np.log(close)
        # Miners follow price with a lag: log hash rate is pulled towards a lagged price level.
        lagged = np.concatenate([np.full(60, log_px[0]), log_px[:-60]])
        log_hr = np.empty(n)
        log_hr[0] = np.log(15.0)  # TH/s
        shocks = rng.normal(0, 0.01, n)
        for t in range(1, n):
            target = lagged[t] + np.log(15.0) - log_px[0] + 0.004 * t / 7
            log_hr[t] = log_hr[t - 1] + 0.03 * (target - log_hr[t - 1]) + 0.001 + shocks[t]
        true_hr = np.exp(log_hr)
        observed_hr = true_hr * np.exp(rng.normal(0, 0.04, n))  # block-time luck in the estimate
        # Difficulty is constant within an epoch and retargets to the previous epoch's hash rate.
        difficulty = np.empty(n)
        epoch = np.arange(n) // RETARGET_DAYS
        diff_per_ths = 1e12 * 600 / 2**32
        difficulty[epoch == 0] = true_hr[0] * diff_per_ths
        for e in range(1, epoch[-1] + 1):
            prev = true_hr[epoch == e - 1].mean() * diff_per_ths
            last = difficulty[epoch == e - 1][0]
            difficulty[epoch == e] = np.clip(prev, last / 4, last * 4)
        weekday = np.arange(n) % 7
        weekly = np.where((weekday == 5) | (weekday == 6), -0.12, 0.0)  # ORIGIN is a Sunday
        smooth_px = _ewma(log_px, 1 / 30)
        sigma = np.sqrt(_ewma_var(ret, 0.94, 0.035**2))
        log_aa = (
            np.log(5e4)
            + 0.55 * (smooth_px - log_px[0])
            + 2.5 * np.abs(ret) / (sigma + 1e-9) * 0.05
            + weekly
            + _ar1(rng, n, 0.8, 0.06)
        )
        active = np.exp(log_aa)
        tx = active * 1.4 * np.exp(_ar1(rng, n, 0.5, 0.05))
        congestion = np.log(tx) - _ewma(np.log(tx), 1 / 90)
        fees = 2e-5 * tx * np.exp(3.0 * congestion + _ar1(rng, n, 0.6, 0.15))
        utxo = 2e6 + np.cumsum(0.08 * tx * np.exp(rng.normal(0, 0.1, n)))
        return pl.DataFrame(
            {
                "asset": "BTC",
                "date": px["ts"].dt.date(),
                "tx_count": np.round(tx),
                "active_addresses": np.round(active),
                "fees_native": fees,
                "hash_rate": observed_hr,
                "difficulty": difficulty,
                "utxo_count": np.round(utxo),
            }
        )


def _window(df: pl.DataFrame, col: str, start: datetime, end: datetime) -> pl.DataFrame:
    if start >= end:
        raise SourceError(f"Empty or inverted window: start {start} is not before end {end}")
    lo, hi = datetime(ORIGIN.year, ORIGIN.month, ORIGIN.day), datetime(HORIZON_END.year, 1, 1)
    if start < lo or end > hi:
        raise SourceError(
            f"The synthetic market covers [{lo:%Y-%m-%d}, {hi:%Y-%m-%d}); "
            f"window [{start:%Y-%m-%d}, {end:%Y-%m-%d}) is outside it"
        )
    if df.schema[col] == pl.Date():
        return df.filter((pl.col(col) >= start.date()) & (pl.col(col) < end.date()))
    return df.filter((pl.col(col) >= start) & (pl.col(col) < end))


# Intraday sessions: crypto trades around the clock, stocks 14:30-21:00 UTC (6.5 hours).
_SESSION = {"crypto": (0, 1440), "stock": (14 * 60 + 30, 390)}  # (first minute, minutes per day)
_MINUTES = {"1m": 1, "1h": 60}


@register("ohlcv", "synthetic")
@dataclass
class SyntheticOHLCV:
    """Daily bars, or 1h / 1m bars that bridge each day's open to its close."""

    symbols: tuple[str, ...] = tuple(SYMBOLS)
    seed: int = 42
    timeframe: str = "1d"
    name: str = "synthetic"
    table: str = "ohlcv"

    def __post_init__(self) -> None:
        self.symbols = check_symbols(self.symbols, tuple(SYMBOLS), "symbols")
        check_timeframe(self.timeframe, ("1d", *_MINUTES), "synthetic")
        self._market = _market(self.seed)

    @property
    def entities(self) -> tuple[str, ...]:
        return self.symbols

    def fetch(self, start: datetime, end: datetime) -> pl.DataFrame:
        frames = []
        for s in self.symbols:
            first_day = datetime.combine(start.date(), datetime.min.time())
            days = _window(
                self._market.ohlcv(s), "ts", first_day, max(end, first_day + timedelta(1))
            )
            if self.timeframe != "1d":
                days = _intraday(days, SYMBOLS[s], _MINUTES[self.timeframe], self.seed, _STREAM[s])
            frames.append(days.filter((pl.col("ts") >= start) & (pl.col("ts") < end)))
        return pl.concat(frames)


@register("onchain", "synthetic")
@dataclass
class SyntheticOnchain:
    assets: tuple[str, ...] = ONCHAIN_ASSETS
    seed: int = 42
    name: str = "synthetic"
    table: str = "onchain"

    def __post_init__(self) -> None:
        self.assets = check_symbols(self.assets, ONCHAIN_ASSETS, "on-chain assets")
        self._market = _market(self.seed)

    @property
    def entities(self) -> tuple[str, ...]:
        return self.assets

    def fetch(self, start: datetime, end: datetime) -> pl.DataFrame:
        return _window(self._market.onchain, "date", start, end)


@register("macro", "synthetic")
@dataclass
class SyntheticMacro:
    series: tuple[str, ...] = MACRO_SERIES
    seed: int = 42
    name: str = "synthetic"
    table: str = "macro"

    def __post_init__(self) -> None:
        self.series = check_symbols(self.series, MACRO_SERIES, "macro series")
        self._market = _market(self.seed)

    @property
    def entities(self) -> tuple[str, ...]:
        return self.series

    def fetch(self, start: datetime, end: datetime) -> pl.DataFrame:
        m = self._market.macro.filter(pl.col("series").is_in(list(self.series)))
        return _window(m, "date", start, end)


def _intraday(
    days: pl.DataFrame, spec: SymbolSpec, step: int, seed: int, stream: int
) -> pl.DataFrame:
    """Bars of `step` minutes for each daily bar: a Brownian bridge from its open to its close.

    Each day draws from its own generator (seeded by seed, symbol and date), so any window of
    intraday bars is the same as the slice of a larger one.
    """
    first, length = _SESSION[spec.kind]
    m = -(-length // step)  # a last partial bar covers the end of a stock session
    n_days = days.height
    if n_days == 0:
        return days
    day_index = (days["ts"].dt.epoch("d") - int(np.datetime64(ORIGIN, "D").astype(int))).to_numpy()
    z = np.empty((n_days, m))
    u = np.empty((n_days, m, 3))
    for i, d in enumerate(day_index):
        rng = np.random.default_rng([seed, stream, 7, int(d)])
        z[i] = rng.standard_normal(m)
        u[i] = rng.random((m, 3))
    lo_open = np.log(days["open"].to_numpy())[:, None]
    lo_close = np.log(days["close"].to_numpy())[:, None]
    sigma = spec.daily_vol / np.sqrt(m)
    walk = np.cumsum(z, axis=1) * sigma
    frac = np.arange(1, m + 1) / m
    path = lo_open + frac * (lo_close - lo_open) + walk - frac * walk[:, -1:]
    opens = np.exp(np.concatenate([lo_open, path[:, :-1]], axis=1))
    closes = np.exp(path)
    wick = sigma * 0.5
    highs = np.maximum(opens, closes) * np.exp(u[:, :, 0] * wick)
    lows = np.minimum(opens, closes) * np.exp(-u[:, :, 1] * wick)
    weights = np.exp(u[:, :, 2] * 2.0)
    volume = days["volume"].to_numpy()[:, None] * weights / weights.sum(axis=1, keepdims=True)
    day_start = days["ts"].to_numpy().astype("datetime64[m]")[:, None]
    offsets = (first + step * np.arange(m)).astype("timedelta64[m]")
    ts = (day_start + offsets).ravel().astype("datetime64[us]")
    return pl.DataFrame(
        {
            "symbol": days["symbol"][0],
            "ts": pl.Series(ts),
            "open": opens.ravel(),
            "high": highs.ravel(),
            "low": lows.ravel(),
            "close": closes.ravel(),
            "volume": volume.ravel(),
        }
    )


@functools.lru_cache(maxsize=4)
def _market(seed: int) -> SyntheticMarket:
    return SyntheticMarket(seed)


# -- stochastic building blocks ----------------------------------------------------------------
def _markov_regimes(rng: np.random.Generator, n: int, stay: float) -> np.ndarray:
    """A 3-state chain (0 bull, 1 bear, 2 range); on leaving a state, the next is uniform."""
    switch = rng.random(n) > stay
    pick = rng.integers(1, 3, n)
    reg = np.empty(n, dtype=np.int64)
    reg[0] = 2
    for t in range(1, n):
        reg[t] = (reg[t - 1] + pick[t]) % 3 if switch[t] else reg[t - 1]
    return reg


def _garch_returns(
    rng: np.random.Generator,
    n: int,
    daily_vol: float,
    drift: np.ndarray,
    vol_mult: np.ndarray,
    df: float,
    alpha: float = 0.08,
    beta: float = 0.90,
) -> np.ndarray:
    """GARCH(1,1) returns with unit-variance Student-t shocks (fat tails, clustering)."""
    omega = daily_vol**2 * (1 - alpha - beta)
    z = rng.standard_t(df, n) / np.sqrt(df / (df - 2))
    out = np.empty(n)
    var = daily_vol**2
    for t in range(n):
        eps = np.sqrt(var) * vol_mult[t] * z[t]
        out[t] = drift[t] + eps
        var = omega + alpha * (eps / vol_mult[t]) ** 2 + beta * var
    return out


def _ou(
    rng: np.random.Generator, n: int, x0: float, mean: float, kappa: float, sigma: float
) -> np.ndarray:
    shocks = rng.normal(0, sigma, n)
    x = np.empty(n)
    x[0] = x0
    for t in range(1, n):
        x[t] = x[t - 1] + kappa * (mean - x[t - 1]) + shocks[t]
    return x


def _ar1(rng: np.random.Generator, n: int, phi: float, sigma: float) -> np.ndarray:
    shocks = rng.normal(0, sigma, n)
    x = np.empty(n)
    x[0] = shocks[0]
    for t in range(1, n):
        x[t] = phi * x[t - 1] + shocks[t]
    return x


def _ewma(x: np.ndarray, alpha: float) -> np.ndarray:
    out = np.empty_like(x)
    out[0] = x[0]
    for t in range(1, len(x)):
        out[t] = (1 - alpha) * out[t - 1] + alpha * x[t]
    return out


def _ewma_var(ret: np.ndarray, lam: float, v0: float) -> np.ndarray:
    out = np.empty_like(ret)
    v = v0
    for t in range(len(ret)):
        out[t] = v
        v = lam * v + (1 - lam) * ret[t] ** 2
    return out
