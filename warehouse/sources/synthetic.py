"""A seeded synthetic market: the embedded default, so a fresh machine runs everything offline.

One path per seed is generated over a fixed horizon and sliced, so fetching any window gives the
same rows as fetching a larger window and cutting it: partitions and backfills agree.

Stylized facts built in: volatility clustering, fat-tailed shocks, a Markov regime (bull / bear /
range) that makes trends, stocks on a business-day calendar with overnight gaps and a shared
market factor, on-chain activity and hash rate coupled to price with difficulty retargeting every
14 days, and macro series published one day after observation.

BTC-USD is calibrated to Bitstamp BTC/USD daily log returns 2015-01-01..2025-06-30 (annualized
volatility, negative skew, kurtosis, clustering of |r|; the figures are in
tests/test_synthetic.py). Its daily log return is

    r_t = L(mu_t + sigma_t * m_t * z_t)
    sigma_{t+1}^2 = omega + (alpha + gamma * [e_t < 0]) * e_t^2 + beta * sigma_t^2,
    e_t = (r_t - mu_t) / m_t

with z_t Hansen's skewed Student-t (zero mean, unit variance, df 4.5, lambda -0.1: the longer
tail on the downside), the GJR leverage term gamma (a fall raises volatility more than a rise),
mu_t the regime drift less 0.8 x the change of the dollar index known that day, m_t the regime
volatility multiplier, and L a soft limit: moves inside [-0.20, +0.12] pass unchanged, beyond
them a tanh saturates towards -0.45 / +0.23, inside the real daily records (-0.494 on 2020-03-12,
+0.238 on 2017-07-20), so no single day wipes out a position the real market would not have.
Every moment of the limited return is finite, which keeps the sample kurtosis from exploding
with one draw the way an unbounded t(4) does. Stocks keep GARCH(1,1) with Student-t shocks.

Planted signal (off by default, `planted` = strength k >= 0; 1 = the documented strength). A
driver s_t, AR(1) with s_t = 0.98 s_{t-1} + sqrt(1 - 0.98^2) e_t (unit stationary variance),
comes from its own random stream, so it changes nothing else's draws. With k > 0:

    log(tx_count_t / active_addresses_t) += 0.08 * s_t            (published, on-chain day t)
    mu_t += k * 0.003 * s_{t-2}                                   (BTC-USD drift on day t)
    m_t  *= exp(k * 0.2 * s_{t-2} - (k * 0.2)^2)                  (BTC-USD volatility on day t)

The features of bar d read on-chain day d-1 (`tx_per_active_address`) and the forward return of
bar d starts with day d+1's return, which moves with s_{d-1}: the value is visible before the
close of bar d and moves nothing up to it. At k = 1 one standard deviation of s shifts the
expected 90-day log return by about 0.003 * (1 - 0.98^90) / 0.02 = 0.126 and the day's
volatility by about +17% / -21% (the -(k * 0.2)^2 keeps the mean variance unchanged). With
k = 0 the driver enters nothing and the market is the unplanted one bit for bit.
"""

from __future__ import annotations

import functools
import math
import numbers
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


@dataclass(frozen=True)
class ShockModel:
    """GJR-GARCH(1,1) with Hansen skewed-t shocks and a soft limit on the daily log move."""

    df: float  # Student-t degrees of freedom of the shocks (> 2)
    skew: float  # Hansen's lambda in (-1, 1); < 0 puts the longer tail on the downside
    alpha: float  # ARCH response to every squared shock
    gamma: float  # extra response to negative shocks (the leverage effect)
    beta: float  # persistence of the conditional variance
    knee_up: float  # daily log moves inside [-knee_down, knee_up] pass unchanged ...
    limit_up: float  # ... and beyond the knee saturate smoothly towards the limit
    knee_down: float
    limit_down: float


SYMBOLS: dict[str, SymbolSpec] = {
    "BTC-USD": SymbolSpec("crypto", 120.0, 0.037),
    "ACME": SymbolSpec("stock", 40.0, 0.012, beta=1.1),
    "GLBX": SymbolSpec("stock", 85.0, 0.010, beta=0.7),
}
ONCHAIN_ASSETS = ("BTC",)
MACRO_SERIES = ("DTWEXBGS", "DGS10", "DGS2", "T10Y2Y")
_STREAM = {
    "macro": 1,
    "market": 2,
    "onchain": 3,
    "BTC-USD": 10,
    "ACME": 11,
    "GLBX": 12,
    "planted": 20,
}

# BTC-USD daily shocks, calibrated to Bitstamp BTC/USD daily log returns 2015-01-01..2025-06-30
# (see tests/test_synthetic.py for the real figures): the limits stay inside the real records
# (+0.238 and -0.494), and the downside gets the longer tail.
BTC_SHOCKS = ShockModel(
    df=4.5,
    skew=-0.1,
    alpha=0.06,
    gamma=0.08,
    beta=0.85,
    knee_up=0.12,
    limit_up=0.23,
    knee_down=0.20,
    limit_down=0.45,
)

# The planted signal (off unless `planted` > 0), per unit of strength; see the module docstring.
PLANTED_PHI = 0.98  # AR(1) persistence of the driver s_t (unit stationary variance)
PLANTED_LAG = 2  # day t's return and volatility move with s_{t-2}
PLANTED_K_MU = 0.003  # daily log-return drift per unit of s: about +0.126 over 90 days
PLANTED_K_SIG = 0.2  # log volatility multiplier per unit of s
PLANTED_C_OBS = 0.08  # log(tx_count / active_addresses) per unit of s (not scaled by strength)


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


def check_planted(planted: object) -> float:
    """The planted-signal strength as a float: a finite number >= 0 (0 turns it off)."""
    if (
        isinstance(planted, bool)
        or not isinstance(planted, numbers.Real)
        or not math.isfinite(planted)
        or planted < 0
    ):
        raise SourceError(
            f"Synthetic option 'planted' (planted-signal strength) must be a finite number "
            f">= 0 (0 = off, 1 = the documented strength), got {planted!r}"
        )
    return float(planted)


class SyntheticMarket:
    """Deterministic for a seed and planted strength: the same ones always give the same history."""

    def __init__(self, seed: int = 42, planted: float = 0.0) -> None:
        if not isinstance(seed, int) or seed < 0:
            raise SourceError(f"Synthetic seed must be a non-negative integer, got {seed!r}")
        self.seed = seed
        self.planted = check_planted(planted)

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

    # -- the planted driver ----------------------------------------------------------------
    @functools.cached_property
    def _driver(self) -> np.ndarray:
        """s_t, one per calendar day: AR(1) with unit stationary variance, from its own stream.

        Drawn whatever the strength; it enters nothing unless `planted` > 0."""
        rng = self._rng("planted")
        e = rng.standard_normal(len(self._days()))
        s = np.empty_like(e)
        s[0] = e[0]  # the stationary distribution, N(0, 1)
        scale = math.sqrt(1 - PLANTED_PHI**2)
        for t in range(1, len(e)):
            s[t] = PLANTED_PHI * s[t - 1] + scale * e[t]
        return s

    def planted_driver(self) -> pl.DataFrame:
        """The planted driver s_t by calendar date (date, driver): published in on-chain day t's
        tx_count when `planted` > 0, and moving BTC-USD from day t + PLANTED_LAG on."""
        dates = pl.Series("date", self._days()).cast(pl.Date)
        return pl.DataFrame({"date": dates, "driver": self._driver})

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
            vol_mult = np.array([0.95, 1.25, 0.75])[reg]
            # The dollar index as it was known on each day (published one day after observation)
            # weighs on crypto: a real, lagged cross-asset effect for features to find.
            dxy = self._dxy_known_on(days)
            dxy_change = np.concatenate([[0.0], np.diff(np.log(dxy))])
            drift = drift - 0.8 * dxy_change
            if self.planted > 0:
                # day t moves with s_{t-2}: on-chain day t-2 is in the features of bar t-1,
                # whose forward return starts with day t
                s = np.concatenate([np.zeros(PLANTED_LAG), self._driver])[:n]
                k_sig = self.planted * PLANTED_K_SIG
                drift = drift + self.planted * PLANTED_K_MU * s
                vol_mult = vol_mult * np.exp(k_sig * s - k_sig**2)
            ret = _gjr_returns(rng, n, spec.daily_vol, drift, vol_mult, BTC_SHOCKS)
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
        tx_noise = _ar1(rng, n, 0.5, 0.05)
        if self.planted > 0:  # publishes the driver: log(tx / active) moves with s_t
            tx_noise = tx_noise + PLANTED_C_OBS * self._driver
        tx = active * 1.4 * np.exp(tx_noise)
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
    if end > hi:  # before its origin the market simply has no rows, like a real one
        raise SourceError(
            f"The synthetic market covers [{lo:%Y-%m-%d}, {hi:%Y-%m-%d}); "
            f"window [{start:%Y-%m-%d}, {end:%Y-%m-%d}) runs past its end"
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
    planted: float = 0.0  # planted-signal strength: 0 off, 1 documented
    timeframe: str = "1d"
    name: str = "synthetic"
    table: str = "ohlcv"

    def __post_init__(self) -> None:
        self.symbols = check_symbols(self.symbols, tuple(SYMBOLS), "symbols")
        check_timeframe(self.timeframe, ("1d", *_MINUTES), "synthetic")
        self.planted = check_planted(self.planted)
        self._market = _market(self.seed, self.planted)

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
    planted: float = 0.0  # planted-signal strength: 0 off, 1 documented
    name: str = "synthetic"
    table: str = "onchain"

    def __post_init__(self) -> None:
        self.assets = check_symbols(self.assets, ONCHAIN_ASSETS, "on-chain assets")
        self.planted = check_planted(self.planted)
        self._market = _market(self.seed, self.planted)

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
    planted: float = 0.0  # planted-signal strength: 0 off, 1 documented
    name: str = "synthetic"
    table: str = "macro"

    def __post_init__(self) -> None:
        self.series = check_symbols(self.series, MACRO_SERIES, "macro series")
        self.planted = check_planted(self.planted)
        self._market = _market(self.seed, self.planted)

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


@functools.lru_cache(maxsize=8)
def _market(seed: int, planted: float = 0.0) -> SyntheticMarket:
    return SyntheticMarket(seed, planted)


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


def _skewed_t(rng: np.random.Generator, n: int, df: float, lam: float) -> np.ndarray:
    """Hansen's (1994) skewed Student-t, zero mean and unit variance.

    y = bz + a is a two-piece t: a unit-variance t scaled by (1 - lam) below zero, drawn with
    probability (1 - lam) / 2, and by (1 + lam) above it."""
    w = np.abs(rng.standard_t(df, n)) * np.sqrt((df - 2) / df)
    left = rng.random(n) < (1 - lam) / 2
    y = np.where(left, -(1 - lam) * w, (1 + lam) * w)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi * (df - 2))
    a = 4 * lam * c * (df - 2) / (df - 1)
    b = math.sqrt(1 + 3 * lam**2 - a**2)
    return (y - a) / b


def _soft_limit(x: float, knee: float, limit: float) -> float:
    """x up to `knee` unchanged; above it a tanh, smooth at the knee, that never passes `limit`."""
    if x <= knee:
        return x
    room = limit - knee
    return knee + room * math.tanh((x - knee) / room)


def _gjr_returns(
    rng: np.random.Generator,
    n: int,
    daily_vol: float,
    drift: np.ndarray,
    vol_mult: np.ndarray,
    m: ShockModel,
) -> np.ndarray:
    """GJR-GARCH(1,1) log returns with skewed-t shocks, each day's move softly limited.

    The variance recursion sees the limited shock with the day's multiplier divided out, so
    `vol_mult` (regimes, the planted signal) scales a day's move without feeding later variance."""
    z = _skewed_t(rng, n, m.df, m.skew)
    # unconditional variance daily_vol**2, counting half the shocks as negative
    omega = daily_vol**2 * (1 - m.alpha - m.gamma / 2 - m.beta)
    out = np.empty(n)
    var = daily_vol**2
    for t in range(n):
        raw = drift[t] + math.sqrt(var) * vol_mult[t] * z[t]
        r = _soft_limit(raw, m.knee_up, m.limit_up)
        r = -_soft_limit(-r, m.knee_down, m.limit_down)
        out[t] = r
        e = (r - drift[t]) / vol_mult[t]
        var = omega + (m.alpha + (m.gamma if e < 0 else 0.0)) * e * e + m.beta * var
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
