"""The statistical baselines (zero return, climatology, persistence, rolling historical
quantiles, EWMA, GARCH, HAR): the forecaster contract on a real fold, causal filters, fits that
never read validation or test labels, and each one's numbers against an independent
computation."""

import math
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
from arch import arch_model

from ml.baselines import Persistence as TransitionTable
from ml.forecasters import (
    DIRECTION,
    QUANTILES,
    REGISTRY,
    FoldData,
    TargetSpec,
)
from ml.forecasters.climatology import Climatology
from ml.forecasters.ewma import Ewma, ewma_variance
from ml.forecasters.garch import Garch
from ml.forecasters.har import Har
from ml.forecasters.historical_quantiles import HistoricalQuantiles
from ml.forecasters.stats_common import MIN_SYMBOL_ROWS
from ml.labels import LabelConfig

NAMES = [
    "zero_return",
    "climatology",
    "persistence",
    "historical_quantiles",
    "ewma",
    "garch",
    "har",
]
FILTERS = ["persistence", "historical_quantiles", "ewma", "garch", "har"]
SPEC = TargetSpec()
Z90 = 1.2815515655446004  # the standard normal's 0.9 quantile
START = datetime(2000, 1, 1)


def _days(n: int, start: datetime = START) -> list[datetime]:
    return [start + timedelta(days=i) for i in range(n)]


def _with(data: FoldData, rows: pl.DataFrame, bars: pl.DataFrame | None = None) -> FoldData:
    """`data` with other rows (and bars); a fresh segment cache."""
    return data.replace(rows=rows, bars=data.bars if bars is None else bars)


def _bars(symbol: str, close: np.ndarray, start: datetime = START, **ohlc) -> pl.DataFrame:
    n = close.size
    return pl.DataFrame(
        {
            "symbol": [symbol] * n,
            "ts": _days(n, start),
            "open": ohlc.get("open", close),
            "high": ohlc.get("high", close),
            "low": ohlc.get("low", close),
            "close": close,
        }
    )


@pytest.fixture(scope="module")
def predictions(synthetic_fold) -> dict[str, pl.DataFrame]:
    """Every statistical baseline fitted on the 2021 synthetic fold, and its predictions."""
    return {name: REGISTRY[name]().fit(synthetic_fold).predict(synthetic_fold) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_predicts_exactly_the_scored_rows_with_valid_finite_columns(
    name, synthetic_fold, predictions
):
    pred, spec = predictions[name], synthetic_fold.targets
    columns = [c for t in REGISTRY[name].targets for c in spec.prediction_columns(t)]
    assert sorted(pred.columns) == sorted(["symbol", "ts", *columns])
    assert pred.select("symbol", "ts").equals(synthetic_fold.scored.select("symbol", "ts"))
    values = pred.select(columns).to_numpy()
    assert np.isfinite(values).all()
    if QUANTILES in REGISTRY[name].targets:
        assert (pred["q10"] < pred["q90"]).all()
    if DIRECTION in REGISTRY[name].targets:
        probs = pred.select("p_down", "p_flat", "p_up").to_numpy()
        assert (probs > 0).all()
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    if "sigma" in pred.columns:
        assert (pred["sigma"] > 0).all()


@pytest.mark.parametrize("name", FILTERS)
def test_prediction_at_t_is_unchanged_when_later_bars_are_cut(name, synthetic_fold, predictions):
    cut = datetime(2021, 6, 30)
    short = _with(
        synthetic_fold,
        synthetic_fold.rows.filter(pl.col("ts") <= cut),
        synthetic_fold.bars.filter(pl.col("ts") <= cut),
    )
    got = REGISTRY[name]().fit(short).predict(short)
    want = predictions[name].filter(pl.col("ts") <= cut)
    assert got.select("symbol", "ts").equals(want.select("symbol", "ts"))
    columns = [c for c in want.columns if c not in ("symbol", "ts")]
    np.testing.assert_allclose(
        got.select(columns).to_numpy(), want.select(columns).to_numpy(), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("name", NAMES)
def test_fit_ignores_validation_and_test_labels(name, synthetic_fold, predictions):
    rng = np.random.default_rng(7)
    scored = pl.col("split") != "train"
    labels = [c for c in synthetic_fold.rows.columns if c.startswith(("fwd_", "direction_"))]
    noise = pl.Series(rng.normal(size=synthetic_fold.rows.height))
    perturbed = synthetic_fold.rows.with_columns(
        *[
            pl.when(scored).then(pl.col(c) * 3.0 + pl.lit(noise)).otherwise(pl.col(c)).alias(c)
            for c in labels
            if not c.startswith("direction_")
        ],
        pl.when(scored)
        .then((pl.col(SPEC.direction) + 1) % 3)
        .otherwise(pl.col(SPEC.direction))
        .cast(synthetic_fold.rows.schema[SPEC.direction])
        .alias(SPEC.direction),
    )
    assert not perturbed.filter(scored).equals(synthetic_fold.rows.filter(scored))
    data = _with(synthetic_fold, perturbed)
    assert REGISTRY[name]().fit(data).predict(data).equals(predictions[name])


def _climatology_fold() -> FoldData:
    """AAA and CCC have 30 training rows each; BBB has none, so it gets the pooled numbers.
    Validation and test rows carry labels no fit may read."""
    n = MIN_SYMBOL_ROWS
    assert n == 30, "the hand-computed numbers below assume 30 training rows per symbol"
    aaa = {
        SPEC.direction: [0] * 12 + [1] * 8 + [2] * 10,
        SPEC.quantile: [k / 100 for k in range(30, 0, -1)],
        SPEC.sigma: [k / 100 for k in range(1, 31)],
        "fwd_ret_1": [0.001, 0.003] * 15,
    }
    ccc = {
        SPEC.direction: [2] * 30,
        SPEC.quantile: [-k / 100 for k in range(1, 31)],
        SPEC.sigma: [0.5] * 30,
        "fwd_ret_1": [-0.01] * 30,
    }
    frames = []
    for symbol, labels in (("AAA", aaa), ("CCC", ccc)):
        frames.append(
            pl.DataFrame({"symbol": [symbol] * n, "ts": _days(n), "split": ["train"] * n, **labels})
        )
    scored_ts = _days(4, START + timedelta(days=100))
    for symbol in ("AAA", "BBB", "CCC"):
        frames.append(
            pl.DataFrame(
                {
                    "symbol": [symbol] * 4,
                    "ts": scored_ts,
                    "split": ["val", "val", "test", "test"],
                    SPEC.direction: [0, 0, 0, 0],
                    SPEC.quantile: [9.0] * 4,
                    SPEC.sigma: [9.0] * 4,
                    "fwd_ret_1": [9.0] * 4,
                }
            )
        )
    rows = (
        pl.concat(frames)
        .with_columns(
            pl.col(SPEC.direction).cast(pl.Int8),
            # fwd_ret_h = h x fwd_ret_1, so the mean of fwd_ret_h is h x the mean of fwd_ret_1
            *[(h * pl.col("fwd_ret_1")).alias(f"fwd_ret_{h}") for h in (5, 10, 30)],
        )
        .sort(["symbol", "ts"])
    )
    bars = pl.concat([_bars(s, np.ones(110)) for s in ("AAA", "BBB", "CCC")])
    cutoff = START + timedelta(days=95)
    return FoldData("tiny", rows, bars, [], SPEC, cutoff, cutoff + timedelta(days=10))


def test_climatology_equals_hand_computed_frequencies_and_quantiles():
    data = _climatology_fold()
    pred = Climatology().fit(data).predict(data)
    by_symbol = {s: pred.filter(pl.col("symbol") == s * 3).row(0, named=True) for s in "ABC"}
    # AAA: counts 12/8/10 plus one each, over 33; 30 values 0.01..0.30: q10 at position
    # 0.1 x 29 = 2.9 (0.03 + 0.9 x 0.01), q90 at 26.1 (0.27 + 0.1 x 0.01); sigma: the root mean
    # square of 0.01..0.30, sqrt((30 x 31 x 61 / 6) / 30) / 100 = sqrt(315.1667) / 100
    want_aaa = {
        "p_down": 13 / 33,
        "p_flat": 9 / 33,
        "p_up": 11 / 33,
        "q10": 0.039,
        "q90": 0.271,
        "sigma": (9455 / 30) ** 0.5 / 100,
        "ret_1": 0.002,
        "ret_5": 0.010,
        "ret_10": 0.020,
        "ret_30": 0.060,
    }
    # BBB, pooled over AAA and CCC: counts 12/8/40 plus one each, over 63; the 60 values
    # -0.30..-0.01, 0.01..0.30: q10 at 5.9 (-0.25 + 0.9 x 0.01), q90 at 53.1 (0.24 + 0.001);
    # sigma: sqrt((30 x 0.03151667 + 30 x 0.25) / 60) = sqrt(0.14075833)
    want_bbb = {
        "p_down": 13 / 63,
        "p_flat": 9 / 63,
        "p_up": 41 / 63,
        "q10": -0.241,
        "q90": 0.241,
        "sigma": ((9455 / 30) * 1e-4 * 30 / 60 + 0.25 * 30 / 60) ** 0.5,
        "ret_1": -0.004,
        "ret_5": -0.020,
        "ret_10": -0.040,
        "ret_30": -0.120,
    }
    for symbol, want in (("A", want_aaa), ("B", want_bbb)):
        got = by_symbol[symbol]
        for column, value in want.items():
            assert got[column] == pytest.approx(value, rel=1e-12, abs=1e-15), (symbol, column)
    assert by_symbol["C"]["p_up"] == pytest.approx(31 / 33)
    assert pred.height == 12 and pred.n_unique(["symbol", "q10"]) == 3  # constant per symbol


def test_zero_return_is_the_driftless_normal_random_walk(synthetic_fold, predictions):
    pred = predictions["zero_return"]
    train = synthetic_fold.train.filter(pl.col("symbol") == "BTC-USD")["fwd_ret_1"].to_numpy()
    sd = train.std(ddof=1) * math.sqrt(90)
    row = pred.filter(pl.col("symbol") == "BTC-USD").row(0, named=True)

    def phi(x: float) -> float:
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    assert row["q90"] == pytest.approx(Z90 * sd, rel=1e-9)
    assert row["q10"] == pytest.approx(-Z90 * sd, rel=1e-9)
    assert row["p_up"] == pytest.approx(1.0 - phi(math.log(1.05) / sd), rel=1e-9)
    assert row["p_down"] == pytest.approx(phi(math.log(0.95) / sd), rel=1e-9)
    assert all(row[f"ret_{h}"] == 0.0 for h in SPEC.return_horizons)
    # per symbol: ACME's training volatility differs from BTC's
    assert pred.filter(pl.col("symbol") == "ACME")["q90"][0] != pytest.approx(row["q90"])


def test_persistence_equals_the_trailing_features_and_transition_table(synthetic_fold, predictions):
    pred = predictions["persistence"]
    scored = synthetic_fold.scored
    # the backward features were computed by ml.features, independently of the forecaster
    for h in SPEC.return_horizons:
        np.testing.assert_allclose(pred[f"ret_{h}"], scored[f"log_ret_{h}"], rtol=1e-12)
    np.testing.assert_allclose(pred["sigma"], scored["realized_vol_30"], rtol=1e-10)
    for symbol in ("ACME", "BTC-USD"):
        table = TransitionTable(LabelConfig()).fit(
            synthetic_fold.train.filter(pl.col("symbol") == symbol), SPEC.direction
        )
        mine = scored.filter(pl.col("symbol") == symbol)
        np.testing.assert_allclose(
            pred.filter(pl.col("symbol") == symbol).select("p_down", "p_flat", "p_up"),
            table.predict_proba(mine),
            rtol=1e-12,
        )


def test_historical_quantiles_use_past_returns_in_the_window_else_training_quantiles(
    synthetic_fold,
):
    window = min_samples = 1500  # some BTC rows have 1500 past 90-bar returns, ACME's never
    model = HistoricalQuantiles(window=window, min_samples=min_samples).fit(synthetic_fold)
    pred = model.predict(synthetic_fold)
    checked = {"rolling": 0, "fallback": 0}
    for symbol in ("ACME", "BTC-USD"):
        bars = synthetic_fold.bars.filter(pl.col("symbol") == symbol)
        log_close = np.log(bars["close"].to_numpy())
        ts = bars["ts"].to_list()
        train = synthetic_fold.train.filter(pl.col("symbol") == symbol)[SPEC.quantile]
        fallback = np.quantile(train.to_numpy(), [0.1, 0.9])
        rows = pred.filter(pl.col("symbol") == symbol)
        for k in range(0, rows.height, 37):
            row = rows.row(k, named=True)
            t = ts.index(row["ts"])
            # log(close_s / close_{s-90}) for s = t - window + 1 .. t with s >= 90
            s = np.arange(max(90, t - window + 1), t + 1)
            past = log_close[s] - log_close[s - 90]
            if past.size >= min_samples:
                want, kind = np.quantile(past, [0.1, 0.9]), "rolling"
            else:
                want, kind = fallback, "fallback"
            np.testing.assert_allclose([row["q10"], row["q90"]], want, rtol=1e-12)
            checked[kind] += 1
    assert checked["rolling"] > 3 and checked["fallback"] > 3


def test_ewma_equals_the_recursion_written_out():
    r = np.array([0.01, -0.02, 0.03, 0.01, -0.04, 0.02])
    lam = 0.94
    mean = (0.01 - 0.02 + 0.03) / 3
    seed = ((0.01 - mean) ** 2 + (-0.02 - mean) ** 2 + (0.03 - mean) ** 2) / 2  # ddof = 1
    s4 = lam * seed + (1 - lam) * 0.01**2
    s5 = lam * s4 + (1 - lam) * 0.04**2
    s6 = lam * s5 + (1 - lam) * 0.02**2
    want = [math.nan, math.nan, seed, s4, s5, s6]
    np.testing.assert_allclose(ewma_variance(r, lam, seed_returns=3), want, rtol=1e-13)

    # through the forecaster: the row at bar t (whose close ends r_t) gets sqrt(s2_t); bars
    # 0..6, the scored ones 3..6 (bar 3 ends r_3, the seed's last return)
    close = 100.0 * np.exp(np.concatenate([[0.0], np.cumsum(r)]))
    bars = _bars("AAA", close)
    rows = bars.select("symbol", "ts").with_columns(
        split=pl.when(pl.int_range(pl.len()) < 3).then(pl.lit("train")).otherwise(pl.lit("val"))
    )
    data = FoldData("tiny", rows, bars, [], SPEC, START, START)
    pred = Ewma(lam=lam, seed_returns=3).fit(data).predict(data)
    np.testing.assert_allclose(pred["sigma"], np.sqrt([seed, s4, s5, s6]), rtol=1e-13)
    np.testing.assert_allclose(pred["q90"], Z90 * np.sqrt([seed, s4, s5, s6]) * math.sqrt(90))


def test_ewma_defaults_are_riskmetrics_seeded_on_30_returns():
    r = np.random.default_rng(3).normal(0.0, 0.02, 32)
    var = ewma_variance(r)
    assert np.isnan(var[:29]).all()
    seed = np.sum((r[:30] - r[:30].mean()) ** 2) / 29
    assert var[29] == pytest.approx(seed, rel=1e-13)
    assert var[30] == pytest.approx(0.94 * seed + 0.06 * r[30] ** 2, rel=1e-13)
    assert Ewma().lam == 0.94


def _simulate_garch(n: int, omega: float, alpha: float, beta: float, nu: float, seed: int):
    """Percent returns of a zero-mean GARCH(1,1) with unit-variance Student-t shocks, and the
    conditional variance of each return given the ones before it."""
    rng = np.random.default_rng(seed)
    z = rng.standard_t(nu, n) / math.sqrt(nu / (nu - 2))
    var = np.empty(n + 1)
    var[0] = omega / (1 - alpha - beta)
    r = np.empty(n)
    for t in range(n):
        r[t] = math.sqrt(var[t]) * z[t]
        var[t + 1] = omega + alpha * r[t] ** 2 + beta * var[t]
    return r, var


def test_garch_recovers_persistence_and_tracks_the_true_conditional_sigma():
    omega, alpha, beta, nu, n, n_fit = 0.05, 0.08, 0.90, 6.0, 9000, 8000
    r, var = _simulate_garch(n, omega, alpha, beta, nu, seed=11)
    close = 100.0 * np.exp(np.concatenate([[0.0], np.cumsum(r / 100)]))
    # NEW: 100 bars before fit_end, too few to fit alone, so it borrows the pooled fit
    new_close = close[-(n - n_fit + 101) :]
    new_start = START + timedelta(days=n_fit - 100)
    bars = pl.concat([_bars("AAA", close), _bars("NEW", new_close, new_start)])
    fit_end = START + timedelta(days=n_fit + 1)  # bars 0..n_fit: returns 1..n_fit
    rows = bars.select("symbol", "ts").with_columns(
        split=pl.when(pl.col("ts") < fit_end).then(pl.lit("train")).otherwise(pl.lit("test"))
    )
    data = FoldData("sim", rows, bars, [], SPEC, fit_end, fit_end)
    model = Garch().fit(data)
    _, _, w_alpha, w_beta, _ = model.params["AAA"]
    assert w_alpha + w_beta == pytest.approx(alpha + beta, abs=0.03)
    assert w_alpha == pytest.approx(alpha, abs=0.04)

    returns = 100 * np.diff(np.log(close))  # r, as the forecaster derives it from the closes
    pooled_returns = np.concatenate([returns[:n_fit], returns[n_fit - 100 : n_fit]])
    pooled = arch_model(pooled_returns, vol="GARCH", p=1, q=1, dist="t", rescale=False)
    # the same likelihood maximized twice: equal to the optimizer's tolerance (SLSQP stops at a
    # relative change of about 1e-6 in the likelihood, which moves the parameters by ~1e-5; a
    # fit of NEW's 100 returns alone differs by 30% or more in every parameter)
    np.testing.assert_allclose(
        model.params["NEW"], pooled.fit(disp="off").params.to_numpy(), rtol=1e-4
    )

    pred = model.predict(data)
    aaa = pred.filter(pl.col("symbol") == "AAA")["sigma"].to_numpy()
    # true sigma at bar t: the mean of the true 1..30-step variance forecasts from var[t + 1]
    vbar, persistence = omega / (1 - alpha - beta), alpha + beta
    decay = persistence ** np.arange(30)
    true_next = var[n_fit + 1 : n + 1]  # variance of return t + 1, known at bar t
    true_sigma = np.sqrt(vbar + np.outer(true_next - vbar, decay).mean(axis=1)) / 100
    assert aaa.size == true_sigma.size
    assert np.corrcoef(aaa, true_sigma)[0, 1] > 0.9
    assert np.median(np.abs(aaa / true_sigma - 1)) < 0.1
    assert np.isfinite(pred["sigma"].to_numpy()).all()


def test_har_recovers_known_coefficients():
    rng = np.random.default_rng(5)
    n, n_fit = 1500, 1100
    log_rv = np.empty(n)
    log_rv[0] = -8.0
    for t in range(1, n):
        log_rv[t] = -8.0 + 0.9 * (log_rv[t - 1] + 8.0) + 0.5 * rng.normal()
    rv = np.exp(log_rv)
    # a bar whose range gives Parkinson's variance exactly rv: ln(H/L) = sqrt(4 ln 2 rv)
    half = 0.5 * np.sqrt(4 * math.log(2) * rv)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.02, n)))
    bars = _bars("AAA", close, high=close * np.exp(half), low=close * np.exp(-half))
    rv_w = np.convolve(rv, np.ones(5) / 5)[:n]  # mean of rv_{t-4..t}, valid from t = 4
    rv_m = np.convolve(rv, np.ones(22) / 22)[:n]  # valid from t = 21
    b = np.array([2e-5, 0.3, 0.25, 0.35])
    target = b[0] + b[1] * rv + b[2] * rv_w + b[3] * rv_m
    noisy = target * (1 + 0.001 * rng.normal(size=n))
    split = np.where(np.arange(n) < n_fit, "train", "test")
    rows = (
        bars.select("symbol", "ts")
        .with_columns(split=pl.Series(split), **{SPEC.sigma: pl.Series(np.sqrt(noisy))})
        .slice(21)
    )
    data = FoldData("sim", rows, bars, [], SPEC, START + timedelta(days=n_fit), START)
    model = Har().fit(data)
    np.testing.assert_allclose(model.fits["AAA"].coef, b, rtol=0.02)
    pred = model.predict(data)
    floor = model.fits["AAA"].floor
    assert 0 < floor < np.median(target)
    np.testing.assert_allclose(pred["sigma"], np.sqrt(np.maximum(target[n_fit:], floor)), rtol=0.01)
