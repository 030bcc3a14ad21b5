"""ml.report: the figures and the self-contained HTML page of a real `evaluate` result, built
from a hand-made long prediction table with known skill."""

import base64
import json
import math
import re
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ml.evaluation import evaluate, metric_table
from ml.forecasters import TargetSpec
from ml.metrics import direction_report
from ml.report import (
    MCS_MARK,
    add_drawdown,
    comparison_verdict,
    drawdown,
    json_safe,
    plot_band,
    plot_equity_drawdown,
    plot_metric_table,
    plot_reliability,
    plot_sigma,
    render_html,
    write_report,
)

TARGETS = TargetSpec()
SYMBOLS = ("AAA", "BBB")
START = datetime(2021, 1, 1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_market(n_test: int = 400, seed: int = 0) -> pl.DataFrame:
    """Per symbol `n_test` daily rows with every label of TargetSpec() computed from a simulated
    log-price path with slowly changing volatility (`vol` is that true daily volatility)."""
    rng = np.random.default_rng(seed)
    h = TARGETS.direction_horizon
    parts = []
    for s, symbol in enumerate(SYMBOLS):
        n = n_test + h + 1
        vol = 0.01 + 0.008 * (1 + np.sin(np.arange(n) / 37 + 2 * s))
        lp = np.r_[0.0, np.cumsum(rng.normal(0.0, vol[1:]))]
        t = np.arange(n_test)
        frame = {"symbol": [symbol] * n_test, "ts": [START + timedelta(days=int(i)) for i in t]}
        frame["vol"] = vol[:n_test]
        for k in {h, *TARGETS.return_horizons}:
            frame[f"fwd_ret_{k}"] = lp[t + k] - lp[t]
        w = TARGETS.sigma_window
        steps = np.diff(lp)  # steps[i] is the return of bar i + 1
        frame[TARGETS.sigma] = np.array([steps[i : i + w].std() for i in t])
        threshold = 0.25 * 0.018 * math.sqrt(h)
        fwd = frame[TARGETS.quantile]
        frame[TARGETS.direction] = np.where(fwd > threshold, 2, np.where(fwd < -threshold, 0, 1))
        parts.append(pl.DataFrame(frame))
    return pl.concat(parts)


def _probs(score: np.ndarray) -> np.ndarray:
    logits = np.c_[-score, np.zeros_like(score), score]
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _skilled(market: pl.DataFrame, rng: np.random.Generator, noise: float) -> dict:
    """Predictions of every target that know the future up to noise (smaller noise, more skill)."""
    n = market.height
    h, vol = TARGETS.direction_horizon, market["vol"].to_numpy()
    fwd = market[TARGETS.quantile].to_numpy()
    p = _probs(1.2 * fwd / (vol * math.sqrt(h)) + rng.normal(0, 2 * noise, n))
    centre = 0.4 * fwd + rng.normal(0, noise * 0.02, n)
    width = 1.1 * vol * math.sqrt(h)
    out = {"p_down": p[:, 0], "p_flat": p[:, 1], "p_up": p[:, 2]}
    out |= {"q10": centre - width, "q90": centre + width}
    out["sigma"] = market[TARGETS.sigma].to_numpy() * np.exp(rng.normal(0, noise * 0.3, n))
    for k in TARGETS.return_horizons:
        y = market[f"fwd_ret_{k}"].to_numpy()
        out[f"ret_{k}"] = 0.3 * y + rng.normal(0, noise * 0.01, n)
    return out


def make_predictions(market: pl.DataFrame, seed: int = 1) -> pl.DataFrame:
    """The long prediction table (test rows only, two folds): mamba2 with seeds 0..2 and their
    mean (seed null), lightgbm, climatology (direction, quantiles, zero returns), ewma (sigma
    and quantiles) and an ensemble of the direction probabilities."""
    rng = np.random.default_rng(seed)
    n, h = market.height, TARGETS.direction_horizon
    columns = ["p_down", "p_flat", "p_up", "q10", "q90", "sigma"]
    columns += [f"ret_{k}" for k in TARGETS.return_horizons]
    seeds = [_skilled(market, rng, 0.9) for _ in range(3)]
    mean = {c: np.mean([s[c] for s in seeds], axis=0) for c in columns}
    freq = np.bincount(market[TARGETS.direction].to_numpy(), minlength=3) / n
    fwd = market[TARGETS.quantile].to_numpy()
    lo, hi = np.quantile(fwd, [0.1, 0.9])
    climatology = {"p_down": np.full(n, freq[0]), "p_flat": np.full(n, freq[1])}
    climatology |= {"p_up": np.full(n, freq[2]), "q10": np.full(n, lo), "q90": np.full(n, hi)}
    climatology |= {f"ret_{k}": np.zeros(n) for k in TARGETS.return_horizons}
    ewma_sigma = market["vol"].to_numpy() * np.exp(rng.normal(0, 0.25, n))
    ewma = {"sigma": ewma_sigma}
    ewma |= {"q10": -1.28 * ewma_sigma * math.sqrt(h), "q90": 1.28 * ewma_sigma * math.sqrt(h)}
    lightgbm = _skilled(market, rng, 1.2)
    ensemble = {
        c: (mean[c] + lightgbm[c] + climatology[c]) / 3 for c in ("p_down", "p_flat", "p_up")
    }
    runs = [("mamba2", i, s) for i, s in enumerate(seeds)] + [("mamba2", None, mean)]
    runs += [("lightgbm", None, lightgbm), ("climatology", None, climatology)]
    runs += [("ewma", None, ewma), ("ensemble", None, ensemble)]
    half = START + timedelta(days=market.filter(pl.col("symbol") == SYMBOLS[0]).height // 2)
    keys = market.select(
        pl.when(pl.col("ts") < half).then(pl.lit("f0")).otherwise(pl.lit("f1")).alias("fold"),
        "symbol",
        "ts",
    )
    parts = []
    for name, seed_, values in runs:
        parts.append(
            keys.with_columns(
                pl.lit(name).alias("forecaster"),
                pl.lit(seed_, dtype=pl.Int64).alias("seed"),
                pl.lit("test").alias("split"),
                *[
                    pl.Series(c, values[c], dtype=pl.Float64)
                    if c in values
                    else pl.lit(None, dtype=pl.Float64).alias(c)
                    for c in columns
                ],
            )
        )
    return pl.concat(parts)


FORECASTERS = ["mamba2", "lightgbm", "climatology", "ewma", "ensemble"]


@pytest.fixture(scope="module")
def market() -> pl.DataFrame:
    return make_market()


@pytest.fixture(scope="module")
def long(market) -> pl.DataFrame:
    """The prediction table joined with the labels, as the figures take it."""
    return make_predictions(market).join(market, on=["symbol", "ts"], how="left")


@pytest.fixture(scope="module")
def results(market) -> dict:
    return evaluate(make_predictions(market), market, TARGETS, n_boot=50, mcs_reps=50)


def test_every_forecaster_of_a_target_is_scored_on_the_same_rows(market):
    """Rows where one forecaster has no finite prediction, or the label is missing, are left
    out for every forecaster of the target: each metric equals its report recomputed by hand on
    exactly the common rows (a forecaster scored on its own rows would differ)."""
    preds = make_predictions(market)
    first = market.filter(pl.col("symbol") == SYMBOLS[0])["ts"]
    no_lgbm, nan_clim, no_label = first[10:40], first[60:80], first[100:105]
    mine = (pl.col("symbol") == SYMBOLS[0]) & pl.col("seed").is_null()
    preds = preds.with_columns(
        p_up=pl.when(mine & (pl.col("forecaster") == "lightgbm") & pl.col("ts").is_in(no_lgbm))
        .then(None)
        .otherwise("p_up"),
        p_down=pl.when(
            mine & (pl.col("forecaster") == "climatology") & pl.col("ts").is_in(nan_clim)
        )
        .then(float("nan"))
        .otherwise("p_down"),
    )
    labels = market.with_columns(
        pl.when((pl.col("symbol") == SYMBOLS[0]) & pl.col("ts").is_in(no_label))
        .then(None)
        .otherwise(pl.col(TARGETS.direction))
        .alias(TARGETS.direction)
    )
    got = evaluate(preds, labels, TARGETS, n_boot=20, mcs_reps=20)["targets"]
    d = got[f"direction_{TARGETS.direction_horizon}"]
    left_out = pl.col("ts").is_in(pl.concat([no_lgbm, nan_clim, no_label])) & (
        pl.col("symbol") == "AAA"
    )
    common = labels.filter(~left_out).select("symbol", "ts", TARGETS.direction)
    assert d["rows"] == common.height == market.height - 55
    assert d["rows_without_prediction"] == {"lightgbm": 30, "climatology": 20}
    single = preds.filter(pl.col("seed").is_null())
    for name in ("mamba2", "lightgbm", "climatology", "ensemble"):
        rows = common.join(
            single.filter(pl.col("forecaster") == name), on=["symbol", "ts"], how="left"
        )
        p = rows.select("p_down", "p_flat", "p_up").to_numpy()
        want = direction_report(rows[TARGETS.direction].to_numpy(), p)
        assert d["metrics"][name] == pytest.approx({**want, "loss": want["log_loss"]}), name
    # the sigma target has none of those gaps: all of its rows are scored
    assert got[f"sigma_{TARGETS.sigma_window}"]["rows"] == market.height
    assert got[f"sigma_{TARGETS.sigma_window}"]["rows_without_prediction"] == {}


def equity_paths() -> pl.DataFrame:
    ts = [START + timedelta(days=i) for i in range(60)]
    rng = np.random.default_rng(3)
    parts = []
    for symbol in SYMBOLS:
        for strategy, drift in (("mamba2", 0.002), ("buy_and_hold", 0.001), ("momentum", 0.0)):
            equity = np.exp(np.cumsum(rng.normal(drift, 0.01, len(ts))))
            parts.append(
                pl.DataFrame({"symbol": symbol, "strategy": strategy, "ts": ts, "equity": equity})
            )
    return pl.concat(parts)


@pytest.fixture(scope="module")
def figures(results, long) -> dict:
    return {
        "metrics_direction_90": plot_metric_table(results, "direction_90"),
        "reliability_direction_90": plot_reliability(results, "direction_90"),
        "band_AAA": plot_band(long, "AAA", "mamba2", TARGETS.quantile),
        "equity": plot_equity_drawdown(equity_paths()),
    }


@pytest.fixture(scope="module")
def page(results, figures) -> str:
    table = pl.DataFrame({"strategy": ["mamba2", "buy_and_hold"], "sharpe": [0.8, 0.5]})
    return render_html(results, figures, table, "Test report")


# ---------------------------------------------------------------------------------------------
# drawdown


def test_drawdown_of_a_hand_made_path():
    np.testing.assert_allclose(drawdown(np.array([1.0, 1.2, 0.9, 1.3])), [0, 0, -0.25, 0])


def test_drawdown_rejects_non_positive_equity():
    with pytest.raises(ValueError, match="> 0"):
        drawdown(np.array([1.0, 0.0, 1.1]))


def test_add_drawdown_runs_per_symbol_and_strategy_in_time_order():
    ts = [START + timedelta(days=i) for i in range(4)]
    paths = pl.DataFrame(
        {
            "symbol": ["A"] * 8,
            "strategy": ["x"] * 4 + ["y"] * 4,
            "ts": ts[::-1] + ts,  # x is given newest first
            "equity": [1.3, 0.9, 1.2, 1.0, 2.0, 1.0, 1.5, 3.0],
        }
    )
    out = add_drawdown(paths)
    x = out.filter(pl.col("strategy") == "x")["drawdown"].to_numpy()
    y = out.filter(pl.col("strategy") == "y")["drawdown"].to_numpy()
    np.testing.assert_allclose(x, [0, 0, -0.25, 0])
    np.testing.assert_allclose(y, [0, -0.5, -0.25, 0])  # y's high of 2.0 is not x's


# ---------------------------------------------------------------------------------------------
# figures


def test_equity_figure_has_an_equity_and_a_drawdown_panel_per_symbol():
    fig = plot_equity_drawdown(equity_paths())
    axes = fig.get_axes()
    assert len(axes) == 2 * len(SYMBOLS)
    for ax_eq, ax_dd in zip(axes[::2], axes[1::2], strict=True):
        assert ax_eq.get_yscale() == "log"
        assert len(ax_eq.get_lines()) == 3 and len(ax_dd.get_lines()) == 3
        assert max(line.get_ydata().max() for line in ax_dd.get_lines()) <= 0
    by_label = {line.get_label().split(" ")[0]: line for line in axes[0].get_lines()}
    # the model is drawn thicker than the baselines and buy-and-hold is dashed
    assert by_label["mamba2"].get_linewidth() > by_label["buy_and_hold"].get_linewidth()
    assert by_label["buy_and_hold"].get_linestyle() == "--"


def test_reliability_figure_shows_models_climatology_and_ensemble_per_class(results):
    fig = plot_reliability(results, "direction_90")
    axes = fig.get_axes()
    assert len(axes) == 6  # down / flat / up, each over its bin histogram
    top = axes[:3]
    for ax in top:
        labels = [line.get_label().split(" ")[0] for line in ax.get_lines()]
        assert labels == ["mamba2", "lightgbm", "climatology", "ensemble", "perfectly"]
    assert [ax.get_title() for ax in top] == ["class down", "class flat", "class up"]
    assert fig.get_axes()[3].patches  # the bin counts underneath


def test_reliability_needs_a_direction_target(results):
    with pytest.raises(ValueError, match="no reliability"):
        plot_reliability(results, "sigma_30")


def test_band_figure_reports_the_coverage_of_the_band(long):
    rows = long.filter(
        (pl.col("symbol") == "AAA") & (pl.col("forecaster") == "mamba2") & pl.col("seed").is_null()
    )
    y = rows[TARGETS.quantile]
    coverage = ((rows["q10"] <= y) & (y <= rows["q90"])).mean()
    fig = plot_band(long, "AAA", "mamba2", TARGETS.quantile)
    title = fig.get_axes()[0].get_title()
    assert f"coverage {coverage:.1%} (nominal 80%)" in title
    assert f"over {rows.height:,} rows" in title


def test_sigma_figure_has_the_realized_line_and_one_per_forecaster(long):
    fig = plot_sigma(long, "BBB", ["mamba2", "ewma"], TARGETS.sigma)
    labels = [line.get_label() for line in fig.get_axes()[0].get_lines()]
    assert labels[0] == f"realized {TARGETS.sigma}"
    assert [lab.split(" ")[0] for lab in labels[1:]] == ["mamba2", "ewma"]
    with pytest.raises(ValueError, match="garch"):
        plot_sigma(long, "BBB", ["garch"], TARGETS.sigma)


def test_metric_figure_lists_forecasters_best_first(results):
    fig = plot_metric_table(results, "direction_90")
    ax = fig.get_axes()[0]
    ticks = sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])
    order = metric_table(results, "direction_90")["forecaster"].to_list()
    assert [t.get_text() for t in ticks] == order
    assert set(order) == set(FORECASTERS) - {"ewma"}  # ewma has no direction forecast


# ---------------------------------------------------------------------------------------------
# HTML


def test_html_names_every_forecaster_and_target(results, page):
    for target in results["targets"]:
        assert f'<section id="{target}">' in page
    for name in FORECASTERS:
        assert f'<td class="name">{name}</td>' in page


def test_html_marks_the_mcs_members_of_each_target(results, page):
    for target, r in results["targets"].items():
        section = page.split(f'<section id="{target}">')[1].split("</section>")[0]
        metrics = section.split("<h3>Models against")[0]
        for name in r["metrics"]:
            row = re.search(rf'<td class="name">{name}</td>.*?</tr>', metrics).group(0)
            assert (MCS_MARK in row) == (name in r["mcs"]["included"]), (target, name)


def test_html_sorts_forecasters_by_loss_and_highlights_the_models(results, page):
    section = page.split('<section id="quantiles_90">')[1].split("<h3>Models against")[0]
    shown = re.findall(r'<tr( class="model")?><td class="name">([^<]+)</td>', section)
    metrics = results["targets"]["quantiles_90"]["metrics"]
    assert [n for _, n in shown] == sorted(metrics, key=lambda n: metrics[n]["loss"])
    assert {n for cls, n in shown if cls} == {"mamba2", "lightgbm"}
    backtest = page.split("<h2>Backtest</h2>")[1]
    assert '<tr class="model"><td>mamba2</td>' in backtest
    assert "<tr><td>buy_and_hold</td>" in backtest


def test_html_gives_the_seed_spread_of_mamba2(results, page):
    spread = results["targets"]["direction_90"]["seeds"]["mamba2"]
    assert len(spread["seeds"]) == 3
    assert "mamba2, each seed alone: mean \u00b1 std over 3" in page
    mean, std = spread["mean"]["loss"], spread["std"]["loss"]
    assert f"{mean:#.4g} \u00b1 {std:#.4g}" in page


def test_html_has_comparisons_and_non_overlapping_tables_where_due(results, page):
    for target, r in results["targets"].items():
        section = page.split(f'<section id="{target}">')[1].split("</section>")[0]
        assert "<h3>Models against every other forecaster</h3>" in section
        assert ("Non-overlapping subsample" in section) == ("non_overlapping" in r), target
    rows = [
        c
        for r in results["targets"].values()
        for c in [*r["comparisons"], *r.get("non_overlapping", {}).get("comparisons", [])]
    ]
    assert len(re.findall(r'<td class="(better|worse|nsd)">', page)) == len(rows)
    # a note flags the rows where only one of the interval and DM finds a difference
    disagree = sum(
        ((c["ci_high"] < 0) or (c["ci_low"] > 0)) != (c["dm_p_value"] < 0.05) for c in rows
    )
    assert page.count("finds a difference)") == disagree


def test_html_embeds_every_figure_as_a_png_data_uri(figures, page):
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == len(figures)
    assert all(base64.b64decode(u).startswith(PNG_MAGIC) for u in uris)
    assert "http://" not in page and "https://" not in page


def test_html_escapes_every_string_it_is_given(results, figures):
    hostile = "<script>alert(1)</script>"
    tampered = {**results, "symbols": [hostile, "BBB"]}
    table = pl.DataFrame({"strategy": [hostile], "sharpe": [1.0]})
    page = render_html(tampered, {"x": figures["equity"]}, table, title=hostile)
    assert "<script" not in page.lower()
    assert page.count("&lt;script&gt;") == 4  # <title>, <h1>, the summary, the backtest table


def test_html_says_when_a_target_was_not_scored(results, figures):
    short = {"target": "returns_99", "rows": 7, "forecasters": ["mamba2"], "too_few": True}
    tampered = {**results, "targets": {**results["targets"], "returns_99": short}}
    page = render_html(tampered, {}, None, "t")
    section = page.split('<section id="returns_99">')[1].split("</section>")[0]
    assert "Not scored: 7 rows" in section
    assert "No backtest table was given" in page
    with pytest.raises(ValueError, match="not scored"):
        plot_metric_table(tampered, "returns_99")


def test_comparison_verdict_needs_both_tests_to_agree():
    row = {"ci_low": -0.3, "ci_high": -0.1, "dm_p_value": 0.01}
    assert comparison_verdict(row) == "better"
    assert comparison_verdict({**row, "ci_low": 0.1, "ci_high": 0.3}) == "worse"
    assert comparison_verdict({**row, "ci_high": 0.2}) == "no significant difference"
    assert comparison_verdict({**row, "dm_p_value": 0.2}) == "no significant difference"
    assert comparison_verdict({**row, "dm_p_value": None}) == "no significant difference"


# ---------------------------------------------------------------------------------------------
# files


def test_write_report_writes_page_json_and_pngs(tmp_path, results, figures):
    nan_results = json.loads(json.dumps(results))
    nan_results["targets"]["returns_1"]["metrics"]["mamba2"]["rank_ic"] = float("nan")
    written = write_report(tmp_path / "out", nan_results, figures, None, "t")
    folder = tmp_path / "out"
    expected = {f"{n}.png" for n in figures} | {"evaluation.html", "evaluation.json"}
    assert {p.name for p in written} == expected
    assert {p.name for p in folder.iterdir()} == expected  # no temporary file left behind
    for name in figures:
        assert (folder / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    text = (folder / "evaluation.json").read_text()
    assert "NaN" not in text
    loaded = json.loads(text)
    assert loaded == json_safe(nan_results)
    assert loaded["targets"]["returns_1"]["metrics"]["mamba2"]["rank_ic"] is None
    assert loaded["targets"]["direction_90"] == results["targets"]["direction_90"]
    assert "data:image/png;base64," in (folder / "evaluation.html").read_text()


def test_write_report_rejects_figure_names_that_are_paths(tmp_path, figures):
    with pytest.raises(ValueError, match="plain file names"):
        write_report(tmp_path, {"targets": {}}, {"../x": figures["equity"]}, None, "t")


def test_coverage_interval_holds_the_true_coverage_on_overlapping_correlated_outcomes():
    """Calibrated 80% bands on 90-bar sums of noise, three symbols sharing most of their shocks
    (one market), 600 dates: over 200 draws the 95% interval holds 0.8 at least 90% of the time
    (a moving-block bootstrap of the rows held it 60-80% of the time here), and it is several
    times wider than for one-bar outcomes."""
    from ml.evaluation import coverage_interval

    rng = np.random.default_rng(3)
    n, h, z = 600, 90, 1.2816  # N(0,1) 10% / 90% quantiles
    ts = np.tile(np.arange(n), 3)
    band = np.column_stack([np.full(3 * n, -z), np.full(3 * n, z)])

    def draw(h: int) -> np.ndarray:
        common = rng.normal(size=n + h)
        own = rng.normal(size=(3, n + h))
        shocks = np.sqrt(0.7) * common + np.sqrt(0.3) * own
        return np.concatenate(
            [np.convolve(s, np.ones(h), "valid")[:n] / np.sqrt(h) for s in shocks]
        )

    held, widths = 0, {1: [], h: []}
    for _ in range(200):
        low, high = coverage_interval(draw(h), band, ts, block=h)
        held += low <= 0.8 <= high
        widths[h].append(high - low)
    assert held >= 180, held
    for _ in range(20):
        low, high = coverage_interval(draw(1), band, ts, block=1)
        widths[1].append(high - low)
    assert np.mean(widths[h]) > 3 * np.mean(widths[1]), widths


def test_the_quantile_target_reports_a_coverage_interval(results):
    for name, r in results["targets"].items():
        if name.startswith("quantiles"):
            for m in r["metrics"].values():
                assert 0 <= m["coverage_ci95_low"] <= m["coverage"] <= m["coverage_ci95_high"] <= 1


def test_html_and_markdown_list_the_neural_models_parameter_counts(results, figures):
    """The report says how big each neural model is, smallest first, with a range when the
    folds differ; the README tables come from the same JSON."""
    from pipelines.results_markdown import parameters_table

    sized = {
        **results,
        "parameters": {
            "mamba2": {"min": 36099, "max": 36099},
            "s4d": {"min": 36011, "max": 36011},
            "lstm": {"min": 36100, "max": 36139},
        },
    }
    page = render_html(sized, figures)
    section = page[page.index("Neural models' sizes") :]
    assert section.index("s4d") < section.index("mamba2") < section.index("lstm")
    assert "36,100 .. 36,139" in section and "36,099" in section
    table = parameters_table(sized)
    assert table.splitlines()[2] == "| s4d | 36,011 |"
    assert "| lstm | 36,100 .. 36,139 |" in table
    assert "Neural models' sizes" not in render_html(results, figures)  # none recorded
    assert parameters_table(results) == ""
