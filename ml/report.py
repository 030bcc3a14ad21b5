"""The evaluation report: figures and a self-contained HTML page of `ml.evaluation.evaluate`'s
results, beside the backtest.

Figures are plain matplotlib `Figure`s on the Agg canvas (no pyplot, so no global state and no
display needed); each function returns one and the caller decides where it goes. The page
embeds every figure as a base64 PNG and carries its CSS inline, so it opens anywhere without
network or JavaScript. Every string that reaches the page is HTML-escaped.

`write_report` writes the page, the results as JSON (NaN as null) and each figure as a PNG,
each file atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from pathlib import Path

import matplotlib.dates as mdates
import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from ml.evaluation import MODELS, metric_table
from ml.forecasters import TargetSpec
from ml.metrics import sigma_qlike_per_row

BASELINE_STRATEGIES = ("buy_and_hold", "momentum")
DIRECTION_CLASSES = {0: "down", 1: "flat", 2: "up"}
# the reference forecasters drawn beside the models in the reliability diagram: more lines than
# this become unreadable
RELIABILITY_REFERENCES = ("climatology", "ensemble")
LOSS_NAMES = {
    "direction": "log loss",
    "quantiles": "pinball loss (q10 + q90)",
    "sigma": "QLIKE",
    "returns": "absolute error",
}
MCS_MARK = "\u2605"  # the star that marks members of the 90% Model Confidence Set
# part of the evaluation artifact's version: bump when the report's content changes
REPORT_CODE_VERSION = "4"
SIGNIFICANCE = 0.05  # DM p-value below which, with the interval, a difference is called

# One fixed look per name across every figure: the models stand out (strong colours, thick
# lines), the trading baselines are black / grey and dashed, other forecasters are muted.
_STYLES = {
    "mamba2": {"color": "#d62728", "lw": 2.2, "ls": "-"},
    "lightgbm": {"color": "#1f77b4", "lw": 2.2, "ls": "-"},
    "ensemble": {"color": "#9467bd", "lw": 1.6, "ls": "-"},
    "ensemble_equal": {"color": "#c5b0d5", "lw": 1.4, "ls": "-"},
    "climatology": {"color": "#555555", "lw": 1.4, "ls": "--"},
    "ewma": {"color": "#2ca02c", "lw": 1.3, "ls": "-"},
    "garch": {"color": "#ff7f0e", "lw": 1.3, "ls": "-"},
    "har": {"color": "#8c564b", "lw": 1.3, "ls": "-"},
    "buy_and_hold": {"color": "#000000", "lw": 1.4, "ls": "--"},
    "momentum": {"color": "#7f7f7f", "lw": 1.4, "ls": "-."},
    # the other sequence models: state-space models solid, recurrent ones dashed, attention
    # dotted; the tree models and the tutorials' ensemble in earth tones
    "mamba1": {"color": "#ff9896", "lw": 1.5, "ls": "-"},
    "s4d": {"color": "#e377c2", "lw": 1.4, "ls": "-"},
    "lstm": {"color": "#98df8a", "lw": 1.3, "ls": "--"},
    "gru": {"color": "#bcbd22", "lw": 1.3, "ls": "--"},
    "cnn_lstm": {"color": "#17becf", "lw": 1.3, "ls": "--"},
    "attention_lstm": {"color": "#ffbb78", "lw": 1.4, "ls": "-."},
    "transformer": {"color": "#aec7e8", "lw": 1.3, "ls": ":"},
    "random_forest": {"color": "#c49c94", "lw": 1.3, "ls": "-"},
    "xgboost": {"color": "#393b79", "lw": 1.3, "ls": "-"},
    "rf_xgb_lstm": {"color": "#637939", "lw": 1.6, "ls": "-"},
    "rf_xgb_lstm_equal": {"color": "#b5cf6b", "lw": 1.4, "ls": "-"},
}
_OTHER_COLORS = ("#17becf", "#bcbd22", "#e377c2", "#aec7e8", "#98df8a", "#ffbb78")


def _style(name: str) -> dict:
    if name in _STYLES:
        return dict(_STYLES[name])
    # stable across runs and figures (str hash is salted per process, so not hash())
    color = _OTHER_COLORS[sum(map(ord, name)) % len(_OTHER_COLORS)]
    return {"color": color, "lw": 1.2, "ls": "-"}


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _date_axis(ax) -> None:
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def _log_ticks(ax) -> None:
    """Readable ticks on a log y axis: plain numbers, and linear steps over narrow ranges (an
    equity curve between 0.8 and 1.5 would otherwise show the single tick 10^0)."""
    lo, hi = ax.get_ylim()
    if hi / lo < 20:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _require(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} needs column(s) {missing}; it has {frame.columns}")


def _target(results: dict, target: str) -> dict:
    targets = results.get("targets", {})
    if target not in targets:
        raise ValueError(f"no target {target!r} in the results; targets are {list(targets)}")
    return targets[target]


def _kind(target: str) -> str:
    """The target type of a target name (`direction_90` -> `direction`)."""
    return target.rsplit("_", 1)[0]


# ---------------------------------------------------------------------------------------------
# equity and drawdown


def drawdown(equity: np.ndarray) -> np.ndarray:
    """Drawdown of an equity path in time order: equity / running maximum - 1 (0 at every new
    high, -0.25 a quarter below the last high). Raises ValueError on non-positive or non-finite
    equity."""
    e = np.asarray(equity, dtype=np.float64)
    if e.ndim != 1 or e.size == 0:
        raise ValueError(f"equity must be a non-empty 1-D path; got shape {e.shape}")
    if not np.isfinite(e).all() or (e <= 0).any():
        raise ValueError("equity must be finite and > 0 (a multiple of the starting capital)")
    return e / np.maximum.accumulate(e) - 1.0


def add_drawdown(paths: pl.DataFrame) -> pl.DataFrame:
    """`paths` (symbol, strategy, ts, equity, ...) sorted by (symbol, strategy, ts) with a
    `drawdown` column computed per (symbol, strategy) as in `drawdown` (replacing any given)."""
    _require(paths, ["symbol", "strategy", "ts", "equity"], "add_drawdown")
    equity = paths["equity"].cast(pl.Float64)
    if equity.null_count() or not np.isfinite(equity.to_numpy()).all() or (equity <= 0).any():
        raise ValueError("equity must be finite and > 0 (a multiple of the starting capital)")
    keys = ["symbol", "strategy"]
    return paths.sort([*keys, "ts"]).with_columns(
        (pl.col("equity") / pl.col("equity").cum_max().over(keys) - 1.0).alias("drawdown")
    )


def plot_equity_drawdown(paths: pl.DataFrame, title: str = "Equity and drawdown") -> Figure:
    """Per symbol an equity panel (log scale, multiple of the starting capital) over a drawdown
    panel (%), one line per strategy; the models are drawn thick and coloured, buy-and-hold and
    momentum black / grey and dashed. Legend entries give the final equity and the worst
    drawdown."""
    order = paths["strategy"].unique(maintain_order=True).to_list()  # legend in input order
    symbols = paths["symbol"].unique(maintain_order=True).to_list()
    paths = add_drawdown(paths)
    fig = _new_figure(13, 4.6 * len(symbols))
    axes = fig.subplots(2 * len(symbols), 1, squeeze=False, height_ratios=[2.4, 1] * len(symbols))
    for i, symbol in enumerate(symbols):
        ax_eq, ax_dd = axes[2 * i, 0], axes[2 * i + 1, 0]
        ax_dd.sharex(ax_eq)
        part = paths.filter(pl.col("symbol") == symbol)
        for strategy in order:
            p = part.filter(pl.col("strategy") == strategy)
            if p.is_empty():
                continue
            style = _style(strategy)
            ts, eq, dd = p["ts"].to_numpy(), p["equity"].to_numpy(), p["drawdown"].to_numpy()
            # baselines under the models, so the models' lines are never hidden
            z = 2 if strategy in BASELINE_STRATEGIES else 3
            label = f"{strategy} (final {eq[-1]:.2f}\u00d7, max DD {100 * dd.min():.0f}%)"
            ax_eq.plot(ts, eq, label=label, zorder=z, **style)
            ax_dd.plot(ts, 100 * dd, zorder=z, **style)
        ax_eq.set_yscale("log")
        _log_ticks(ax_eq)
        ax_eq.set_title(f"{symbol}: equity by strategy")
        ax_eq.set_ylabel("equity (\u00d7 start, log scale)")
        # beside the panel: with a dozen strategies a legend inside hides the lines
        ax_eq.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        ax_eq.tick_params(labelbottom=False)
        ax_dd.set_ylabel("drawdown (%)")
        ax_dd.set_xlabel("date")
        _date_axis(ax_dd)
        for ax in (ax_eq, ax_dd):
            ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------------------------
# forecasts


def reliability_forecasters(names: Sequence[str], models: Sequence[str] = MODELS) -> list[str]:
    """The forecasters a reliability diagram shows by default: the models, then the
    RELIABILITY_REFERENCES present (climatology, ensemble), in that order; the first three
    names when none of those is there."""
    chosen = [n for n in (*models, *RELIABILITY_REFERENCES) if n in names]
    return chosen or list(names[:3])


def plot_reliability(
    results: dict, target: str, forecasters: Sequence[str] | None = None
) -> Figure:
    """Reliability diagram of a direction target's probabilities from
    `results["targets"][target]["reliability"]`: one column per class (down, flat, up), mean
    predicted probability against observed frequency per bin, one line per forecaster
    (`reliability_forecasters` by default) with its expected calibration error in the legend,
    the diagonal, and underneath the share of rows in each probability bin."""
    r = _target(results, target)
    tables = r.get("reliability")
    if not tables:
        raise ValueError(f"target {target!r} has no reliability table (direction targets only)")
    names = (
        list(forecasters)
        if forecasters
        else reliability_forecasters(list(tables), results.get("models", MODELS))
    )
    unknown = [n for n in names if n not in tables]
    if unknown:
        raise ValueError(f"no reliability table for {unknown}; known: {list(tables)}")
    frames = {n: pl.DataFrame(tables[n]) for n in names}
    fig = _new_figure(13, 5.6)
    axes = fig.subplots(2, 3, height_ratios=[3, 1], squeeze=False)
    for col, (k, cls) in enumerate(DIRECTION_CLASSES.items()):
        ax, ax_n = axes[0, col], axes[1, col]
        ax_n.sharex(ax)
        lows, highs = [], []
        for n in names:
            t = frames[n].filter(pl.col("class") == k).sort("bin_low")
            if t.is_empty():
                continue
            style = _style(n)
            count = t["count"].to_numpy()
            pred, obs = t["mean_predicted"].to_numpy(), t["observed_frequency"].to_numpy()
            ece = float(np.sum(count * np.abs(pred - obs)) / count.sum())
            ax.plot(pred, obs, marker="o", ms=4, label=f"{n} (ECE {ece:.3f})", **style)
            edges = np.r_[t["bin_low"].to_numpy(), t["bin_high"][-1]]
            # the bins of the table are contiguous only where no bin is empty: rebuild the full
            # grid so the histogram shows empty bins as 0
            width = float(t["bin_high"][0] - t["bin_low"][0])
            grid = np.round(np.arange(0.0, 1.0 + width / 2, width), 10)
            share = np.zeros(grid.size - 1)
            idx = np.clip(np.round(t["bin_low"].to_numpy() / width).astype(int), 0, share.size - 1)
            share[idx] = 100 * count / count.sum()
            ax_n.stairs(share, grid, color=style["color"], lw=style["lw"], ls=style["ls"])
            lows.append(min(edges[0], obs.min()))
            highs.append(max(edges[-1], obs.max()))
        lo = max(0.0, min(lows, default=0.0)) - 0.02
        hi = min(1.0, max(highs, default=1.0)) + 0.02
        ax.plot([lo, hi], [lo, hi], color="#999999", lw=1, ls=":", label="perfectly calibrated")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(f"class {cls}")
        ax.set_ylabel(f"observed frequency of {cls}")
        ax.tick_params(labelbottom=False)
        ax.legend(loc="upper left", fontsize=7)
        ax_n.set_xlabel(f"predicted probability of {cls}")
        ax_n.set_ylabel("rows per bin (%)")
        for a in (ax, ax_n):
            a.grid(alpha=0.3)
    rows = r.get("rows", 0)
    fig.suptitle(f"Reliability of the direction probabilities, {target} ({rows:,} test rows)")
    return fig


def _single(frame: pl.DataFrame, symbol: str, forecaster: str | None) -> pl.DataFrame:
    """One symbol's rows, and one forecaster's where the frame is the long table (the seed
    mean, seed null, for seeded forecasters)."""
    out = frame.filter(pl.col("symbol") == symbol)
    if forecaster is not None and "forecaster" in out.columns:
        out = out.filter(pl.col("forecaster") == forecaster)
    if "seed" in out.columns:
        out = out.filter(pl.col("seed").is_null())
    return out.sort("ts")


def _finite_rows(frame: pl.DataFrame, columns: Sequence[str]) -> pl.DataFrame:
    return frame.filter(pl.all_horizontal([pl.col(c).is_finite() for c in columns]))


def _nominal(lower: str, upper: str) -> float | None:
    lo, hi = re.fullmatch(r"q(\d+)", lower), re.fullmatch(r"q(\d+)", upper)
    return (int(hi.group(1)) - int(lo.group(1))) / 100 if lo and hi else None


def plot_band(
    frame: pl.DataFrame,
    symbol: str,
    model: str,
    label: str = "fwd_ret_90",
    lower: str = "q10",
    upper: str = "q90",
) -> Figure:
    """The `model`'s `lower`-`upper` quantile band forecast at t against the forward return
    realized from t (`label`, plotted at t), in %, for one symbol, with the rows outside the
    band marked and the empirical coverage (and the nominal one) in the title. `frame` has
    symbol, ts, the band columns and `label`; a `forecaster` column, if present, selects
    `model`'s rows. Rows with a missing band or label are left out."""
    _require(frame, ["symbol", "ts", lower, upper, label], "plot_band")
    rows = _finite_rows(_single(frame, symbol, model), [lower, upper, label])
    if rows.is_empty():
        raise ValueError(f"no rows of {symbol!r} / {model!r} with {lower}, {upper} and {label}")
    ts = rows["ts"].to_numpy()
    lo, hi, y = (100 * rows[c].to_numpy() for c in (lower, upper, label))
    inside = (lo <= y) & (y <= hi)
    fig = _new_figure(11, 4.2)
    ax = fig.subplots()
    color = _style(model)["color"]
    ax.fill_between(ts, lo, hi, color=color, alpha=0.25, lw=0, label=f"{model} {lower}-{upper}")
    ax.plot(ts, y, color="black", lw=0.8, label=f"realized {label}")
    ax.scatter(
        ts[~inside],
        y[~inside],
        s=9,
        color="#d62728",
        zorder=3,
        label=f"outside the band ({int((~inside).sum())} rows)",
    )
    ax.axhline(0.0, color="#999999", lw=0.8)
    nominal = _nominal(lower, upper)
    expected = f" (nominal {nominal:.0%})" if nominal is not None else ""
    ax.set_title(
        f"{symbol}: {model} {lower}-{upper} band vs realized {label}, "
        f"coverage {inside.mean():.1%}{expected} over {inside.size:,} rows"
    )
    ax.set_xlabel("forecast date t (the return is realized over the following bars)")
    ax.set_ylabel(f"{label} (log return, %)")
    _date_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_sigma(
    frame: pl.DataFrame,
    symbol: str,
    forecasters: Sequence[str],
    label: str = "fwd_vol_30",
) -> Figure:
    """Volatility forecasts (`sigma`, std of 1-bar log returns, in %) of several forecasters
    against the realized forward volatility `label` over time, for one symbol; each legend
    entry gives the forecaster's QLIKE on its plotted rows. `frame` is the long table (symbol,
    ts, forecaster, sigma, `label`; seed means are used for seeded forecasters)."""
    _require(frame, ["symbol", "ts", "forecaster", "sigma", label], "plot_sigma")
    if not forecasters:
        raise ValueError("plot_sigma needs at least one forecaster")
    part = _single(frame, symbol, None)
    present = set(part["forecaster"].unique().to_list())
    missing = [n for n in forecasters if n not in present]
    if missing:
        raise ValueError(f"no rows of {symbol!r} for {missing}; present: {sorted(present)}")
    fig = _new_figure(11, 4.2)
    ax = fig.subplots()
    realized = _finite_rows(part.select("ts", label).unique("ts").sort("ts"), [label])
    ax.plot(
        realized["ts"].to_numpy(),
        100 * realized[label].to_numpy(),
        color="black",
        lw=1.6,
        label=f"realized {label}",
        zorder=4,
    )
    for n in forecasters:
        rows = _finite_rows(part.filter(pl.col("forecaster") == n), ["sigma", label])
        if rows.is_empty():
            continue
        qlike = float(sigma_qlike_per_row(rows[label].to_numpy(), rows["sigma"].to_numpy()).mean())
        # daily forecasts are noisy: thick lines would bury the realized one and each other
        style = _style(n) | {"lw": 1.0, "alpha": 0.85}
        ax.plot(
            rows["ts"].to_numpy(),
            100 * rows["sigma"].to_numpy(),
            label=f"{n} (QLIKE {qlike:.3f})",
            **style,
        )
    ax.set_title(f"{symbol}: volatility forecasts vs realized {label}")
    ax.set_xlabel("forecast date t (the volatility is realized over the following bars)")
    ax.set_ylabel("volatility of 1-bar log returns (%)")
    ax.set_ylim(bottom=0)
    _date_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_recent_forecasts(frame: pl.DataFrame, symbol: str, targets) -> Figure:
    """`latest_forecast`'s recent forecasts for one symbol against what happened: the p10-p90
    band of the `targets.quantile` return with the realized return where its window has ended
    (top), and sigma with the realized `targets.sigma` volatility (bottom), by as-of bar.
    `frame` has symbol, as_of, the band columns, sigma and the two label columns (null where
    not known yet)."""
    lo_col, hi_col = targets.quantile_columns
    label, vol = targets.quantile, targets.sigma
    _require(frame, ["symbol", "as_of", lo_col, hi_col, "sigma", label, vol], "recent forecasts")
    rows = frame.filter(pl.col("symbol") == symbol).sort("as_of")
    if rows.is_empty():
        raise ValueError(f"no forecasts of {symbol!r}")
    t = rows["as_of"].to_numpy()
    fig = _new_figure(11, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    color = _style("mamba2")["color"]
    lo, hi = 100 * rows[lo_col].to_numpy(), 100 * rows[hi_col].to_numpy()
    top.fill_between(t, lo, hi, color=color, alpha=0.25, lw=0, label=f"{lo_col}-{hi_col}")
    done = _finite_rows(rows, [label])
    if done.height:
        y = 100 * done[label].to_numpy()
        inside = (done[lo_col].to_numpy() * 100 <= y) & (y <= done[hi_col].to_numpy() * 100)
        top.plot(done["as_of"].to_numpy(), y, color="black", lw=0.9, label=f"realized {label}")
        cover = f", {inside.mean():.0%} of {inside.size} realized inside"
    else:
        cover = ", none realized yet"
    top.axhline(0.0, color="#999999", lw=0.8)
    top.set_title(f"{symbol}: forecasts by as-of bar, newest {rows['as_of'].max():%Y-%m-%d}{cover}")
    top.set_ylabel(f"{label} (log return, %)")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(t, 100 * rows["sigma"].to_numpy(), color=color, lw=1.2, label="sigma forecast")
    seen = _finite_rows(rows, [vol])
    if seen.height:
        bottom.plot(
            seen["as_of"].to_numpy(),
            100 * seen[vol].to_numpy(),
            color="black",
            lw=1.2,
            label=f"realized {vol}",
        )
    bottom.set_ylabel("volatility of 1-bar log returns (%)")
    bottom.set_xlabel("as-of bar (the outcome is realized over the following bars)")
    bottom.set_ylim(bottom=0)
    bottom.legend(loc="upper left", fontsize=8)
    bottom.grid(alpha=0.3)
    _date_axis(bottom)
    return fig


def plot_metric_table(results: dict, target: str) -> Figure:
    """Every forecaster's mean primary loss on `target` as a dot chart sorted by loss (best on
    top): models in their colours, baselines grey, members of the 90% MCS filled and starred,
    the seed spread (std) of seeded forecasters as an error bar. A dot chart rather than bars
    because the losses of competing forecasters are close: bars from 0 would hide the gaps."""
    table = metric_table(results, target)
    if table.is_empty():
        raise ValueError(f"target {target!r} was not scored (too few rows)")
    models = set(results.get("models", MODELS))
    names = table["forecaster"].to_list()
    fig = _new_figure(9, 1.4 + 0.42 * len(names))
    ax = fig.subplots()
    y = np.arange(len(names))[::-1]  # best (lowest loss) at the top
    for yi, row in zip(y, table.iter_rows(named=True), strict=True):
        color = _style(row["forecaster"])["color"] if row["forecaster"] in models else "#777777"
        std = row["loss_seed_std"]
        ax.errorbar(
            row["loss"],
            yi,
            xerr=std if std else None,
            fmt="o",
            ms=8,
            capsize=3,
            color=color,
            mfc=color if row["in_mcs_90"] else "white",
            mew=1.6,
        )
        note = f"  {row['loss']:.4g}" + (f"  {MCS_MARK}" if row["in_mcs_90"] else "")
        ax.annotate(
            note,
            (row["loss"], yi),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.axvline(table["loss"][0], color="#bbbbbb", lw=0.8, ls=":", zorder=0)
    ax.set_yticks(y, names)
    lo, hi = table["loss"].min(), table["loss"].max()
    # a single forecaster (or equal losses) has no spread to scale the margins by
    pad = 0.06 * (hi - lo) if hi > lo else max(0.05 * abs(hi), 1e-3)
    ax.set_xlim(lo - pad, hi + 4 * pad)  # room on the right for the value labels
    loss = LOSS_NAMES.get(_kind(target), "loss")
    seeded = table["loss_seed_std"].drop_nulls().len() > 0
    ax.set_xlabel(
        f"mean {loss} (lower is better)" + (", error bar: std over seeds" if seeded else "")
    )
    rows = _target(results, target).get("rows", 0)
    ax.set_title(f"{target}: mean {loss} per forecaster ({rows:,} rows)")
    ax.grid(axis="x", alpha=0.3)
    handles = [
        Line2D([], [], marker="o", ls="", color="#777777", label=f"in 90% MCS ({MCS_MARK})"),
        Line2D([], [], marker="o", ls="", color="#777777", mfc="white", label="outside the MCS"),
        *[
            Line2D([], [], marker="o", ls="", color=_style(m)["color"], label=f"model: {m}")
            for m in results.get("models", MODELS)
            if m in names
        ],
    ]
    # outside the axes: inside it would cover the worst forecasters, drawn bottom right
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1250px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em;
     margin-top: 2em; } h3 { margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.model td { background: #fff2e0; } tr.model td.name { font-weight: 600; }
tr.seeds td { background: #fffaf2; color: #555; font-style: italic; font-size: 0.95em; }
.mcs { color: #1a7f37; font-weight: 600; }
.better { color: #1a7f37; font-weight: 600; } .worse { color: #b42318; font-weight: 600; }
.nsd { color: #666; }
.meta, .note { color: #555; font-size: 0.92em; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: object) -> str:
    """A table cell's text for a number (or None / bool / anything else)."""
    if value is None:
        return "\u2013"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        v = float(value)
        if not math.isfinite(v):
            return "\u2013" if math.isnan(v) else ("\u221e" if v > 0 else "\u2212\u221e")
        if v == 0:
            return "0"
        # four significant digits whatever the scale (variances are ~1e-8, losses ~1), with
        # trailing zeros kept so that a column's numbers line up
        return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:#.4g}"
    return str(value)


def _pvalue(p: float | None) -> str:
    if p is None:
        return "\u2013"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _cell(text: str, cls: str = "num") -> str:
    """A <td>; `text` must already be escaped."""
    return f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>"


def _head(columns: Sequence[str]) -> str:
    return "<tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr>"


def _significance(row: Mapping, alpha: float) -> tuple[bool, bool]:
    """(the interval excludes 0, the DM p-value is below alpha); missing values say no. The
    p-value is the Holm-adjusted one where the row has it (each model's family of comparisons
    on a target is one family)."""
    lo, hi = row.get("ci_low"), row.get("ci_high")
    p = row.get("dm_p_holm", row.get("dm_p_value"))
    interval = lo is not None and hi is not None and (hi < 0 or lo > 0)
    return interval, p is not None and p < alpha


def comparison_verdict(row: Mapping, alpha: float = SIGNIFICANCE) -> str:
    """'better' when the model's loss is significantly lower than the baseline's by both tests
    (the bootstrap interval of model - baseline lies below 0 and the DM p-value is below
    `alpha`), 'worse' when significantly higher by both, otherwise 'no significant
    difference'. A missing interval or p-value counts as not significant."""
    interval, dm = _significance(row, alpha)
    if not (interval and dm):
        return "no significant difference"
    return "better" if row["ci_high"] < 0 else "worse"


_VERDICT_CLASS = {"better": "better", "worse": "worse", "no significant difference": "nsd"}


def _ordered_metrics(r: dict) -> tuple[list[str], list[str]]:
    """(forecasters sorted by loss, metric columns with `loss` first). A report metric equal to
    the loss for every forecaster (log_loss, qlike, mae) is left out: it would repeat it."""
    metrics = r["metrics"]
    names = sorted(metrics, key=lambda n: (metrics[n]["loss"] is None, metrics[n]["loss"] or 0))
    keys = [k for k in metrics[names[0]] if k != "loss"]

    def repeats_loss(k: str) -> bool:
        return all(
            metrics[n].get(k) is not None
            and math.isclose(metrics[n][k], metrics[n]["loss"], rel_tol=1e-9, abs_tol=1e-15)
            for n in names
        )

    return names, ["loss", *[k for k in keys if not repeats_loss(k)]]


def _loss_header(r: dict, columns: list[str]) -> str:
    metrics = r["metrics"]
    name = next(iter(metrics))
    same = [k for k in metrics[name] if k not in columns and k != "loss"]
    loss = LOSS_NAMES.get(_kind(r["target"]), "loss")
    return f"loss: mean {loss}" + (f" (= {same[0]})" if same else "")


def _metrics_table(r: dict, models: set[str]) -> str:
    names, columns = _ordered_metrics(r)
    mcs = r.get("mcs", {})
    included, pvalues = set(mcs.get("included", [])), mcs.get("pvalues", {})
    alpha = mcs.get("alpha", 0.10)
    headers = ["forecaster", _loss_header(r, columns), *columns[1:]]
    headers.append(f"{1 - alpha:.0%} MCS (p-value)")
    out = ["<table>", _head(headers)]
    for n in names:
        m = r["metrics"][n]
        mark = f'<span class="mcs">{MCS_MARK}</span> ' if n in included else ""
        cls = ' class="model"' if n in models else ""
        cells = [_cell(_e(n), "name"), *[_cell(_e(_num(m.get(k)))) for k in columns]]
        cells.append(_cell(mark + _e(_pvalue(pvalues.get(n)))))
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
        seeds = r.get("seeds", {}).get(n)
        if seeds:
            mean, std = seeds["mean"], seeds["std"]
            spread = [_cell(_e(f"{_num(mean.get(k))} \u00b1 {_num(std.get(k))}")) for k in columns]
            label = f"\u21b3 {n}, each seed alone: mean \u00b1 std over {len(seeds['seeds'])}"
            out.append(
                '<tr class="seeds">' + _cell(_e(label), "") + "".join(spread) + "<td></td></tr>"
            )
    out.append("</table>")
    return "\n".join(out)


def _disagreement(row: Mapping) -> str:
    """A note for the verdict cell when only one of the two tests finds a difference."""
    interval, dm = _significance(row, SIGNIFICANCE)
    if interval == dm:
        return ""
    which = "the interval" if interval else "DM"
    return f' <span class="note">(only {which} finds a difference)</span>'


def _comparisons_table(rows: list[dict], level: str) -> str:
    if not rows:
        return '<p class="note">No comparisons (no model among the forecasters).</p>'
    headers = [
        "model",
        "baseline",
        "mean loss difference (model \u2212 baseline)",
        f"{level} block-bootstrap interval",
        "DM statistic",
        "DM p-value",
        "Holm p-value",
        "HAC lags",
        "verdict",
    ]
    out = ["<table>", _head(headers)]
    for c in rows:
        verdict = comparison_verdict(c)
        interval = f"[{_num(c.get('ci_low'))}, {_num(c.get('ci_high'))}]"
        cells = [
            _cell(_e(c["model"]), "name"),
            _cell(_e(c["baseline"]), ""),
            _cell(_e(_num(c.get("mean_diff")))),
            _cell(_e(interval)),
            _cell(_e(_num(c.get("dm_stat")))),
            _cell(_e(_pvalue(c.get("dm_p_value")))),
            _cell(_e(_pvalue(c.get("dm_p_holm")))),
            _cell(_e(_num(c.get("dm_lags")))),
            _cell(_e(verdict) + _disagreement(c), _VERDICT_CLASS[verdict]),
        ]
        out.append('<tr class="model">' + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _non_overlapping(r: dict, names: list[str], models: set[str]) -> str:
    sub = r["non_overlapping"]
    metrics = sub["metrics"]
    columns = list(next(iter(metrics.values())))
    out = [
        f"<h3>Non-overlapping subsample: every {r['horizon']}th row per symbol "
        f"({_num(sub['rows'])} rows)</h3>",
        '<p class="note">No two rows share a bar of their label windows, so the tests below '
        "treat the rows as one-step ahead (bootstrap blocks of one row, only the default small "
        "HAC lag), at the price of far fewer rows. Forecasters in the order of the full-sample "
        "table.</p>",
        "<table>",
        _head(["forecaster", *columns]),
    ]
    for n in (n for n in names if n in metrics):
        cls = ' class="model"' if n in models else ""
        cells = [_cell(_e(n), "name"), *[_cell(_e(_num(metrics[n].get(k)))) for k in columns]]
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    out.append(_comparisons_table(sub.get("comparisons", []), "95%"))
    return "\n".join(out)


def _target_section(name: str, r: dict, models: set[str]) -> str:
    out = [f'<section id="{_e(name)}">', f"<h2>{_e(name)}</h2>"]
    if not r.get("metrics"):
        out.append(
            f'<p class="note">Not scored: {_num(r.get("rows", 0))} rows with a label and every '
            "forecaster's prediction, too few for the tests.</p></section>"
        )
        return "\n".join(out)
    period = r.get("period") or ["?", "?"]
    meta = (
        f"Label <code>{_e(r['label'])}</code>, horizon {_e(r['horizon'])} bars, "
        f"{_e(_num(r['rows']))} rows scored, {_e(period[0])} to {_e(period[1])}."
    )
    dropped = r.get("rows_without_prediction") or {}
    if dropped:
        meta += " Rows left out because a forecaster had no prediction: " + ", ".join(
            f"{_e(n)} {_e(_num(k))}" for n, k in dropped.items()
        )
        meta += "."
    out.append(f'<p class="meta">{meta}</p>')
    out.append("<h3>Metrics</h3>")
    out.append(_metrics_table(r, models))
    out.append("<h3>Models against every other forecaster</h3>")
    out.append(_comparisons_table(r.get("comparisons", []), "95%"))
    if r.get("non_overlapping"):
        out.append(_non_overlapping(r, _ordered_metrics(r)[0], models))
    out.append("</section>")
    return "\n".join(out)


def _summary(results: dict) -> str:
    targets = results.get("targets", {})
    periods = [r["period"] for r in targets.values() if r.get("period")]
    period = (
        f"{min(p[0] for p in periods)} to {max(p[1] for p in periods)}" if periods else "\u2013"
    )
    folds = results.get("folds", [])
    items = [
        ("Test period", period),
        ("Folds", f"{len(folds)} ({', '.join(map(str, folds))})"),
        ("Test rows (symbol \u00d7 bar)", _num(results.get("test_rows"))),
        ("Symbols", ", ".join(map(str, results.get("symbols", [])))),
        ("Models", ", ".join(map(str, results.get("models", [])))),
    ]
    out = ["<table>"]
    out += [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items]
    out.append("</table>")
    # one line per target: who is best, who is in the MCS, how each model fared
    out.append("<table>")
    out.append(_head(["target", "rows", "lowest loss", "90% MCS", "models vs the others"]))
    for name, r in targets.items():
        if not r.get("metrics"):
            out.append(
                f"<tr><td>{_e(name)}</td>{_cell(_e(_num(r.get('rows', 0))))}"
                '<td colspan="3">not scored</td></tr>'
            )
            continue
        best = _ordered_metrics(r)[0][0]
        tally = []
        for m in results.get("models", []):
            verdicts = [comparison_verdict(c) for c in r.get("comparisons", []) if c["model"] == m]
            if verdicts:
                tally.append(
                    f"{m}: better than {verdicts.count('better')}, worse than "
                    f"{verdicts.count('worse')} of {len(verdicts)}"
                )
        out.append(
            f'<tr><td><a href="#{_e(name)}">{_e(name)}</a></td>'
            + _cell(_e(_num(r["rows"])))
            + f"<td>{_e(best)}</td><td>{_e(', '.join(r['mcs']['included']))}</td>"
            + f"<td>{_e('; '.join(tally) or '-')}</td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


_HOW_TO_READ = (
    "Every forecaster of a target is scored on exactly the same out-of-sample rows. "
    "<b>Lower loss is better</b> (log loss for the direction probabilities, the summed pinball "
    "loss of the two quantiles, QLIKE for volatility, the squared error for returns). "
    f"{MCS_MARK} marks the <b>90% Model Confidence Set</b>: the forecasters not significantly "
    "worse than the best at the 10% level; its p-value is the largest level at which the "
    "forecaster stays in the set. In the comparisons a negative difference favours the model; "
    "both tests run on the per-date mean loss differential (symbols on the same date move "
    "together, so dates, not rows, are the independent units): the interval is a moving-block "
    "bootstrap whose blocks span one label horizon of dates (so a block covers every symbol on "
    "those dates and never joins one symbol's series to another's), and the Diebold-Mariano "
    "test uses HAC (Newey-West) lags of 2 (horizon \u2212 1), because neighbouring rows share "
    "most of their label window. A difference is called <i>better</i> or <i>worse</i> only "
    "when both agree: the interval excludes 0 and the Holm-adjusted DM p-value (over each "
    f"model's comparisons on the target) is below {SIGNIFICANCE:g}. Neural models are scored "
    "as the mean of their seeds; "
    "the italic row under them gives each seed alone as mean \u00b1 std."
)


def _figure_block(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure id="fig-{_e(name)}"><img src="data:image/png;base64,{data}" '
        f'alt="{_e(name)}"><figcaption>{_e(name)}</figcaption></figure>'
    )


def _backtest(table: pl.DataFrame | None, models: set[str]) -> str:
    if table is None or table.is_empty():
        return '<p class="note">No backtest table was given.</p>'
    out = ["<table>", _head(table.columns)]
    for row in table.iter_rows(named=True):
        cells = []
        for v in row.values():
            numeric = isinstance(v, int | float) and not isinstance(v, bool)
            cells.append(_cell(_e(_num(v)), "num" if numeric else ""))
        cls = ' class="model"' if row.get("strategy") in models else ""
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _parameters(results: dict) -> str:
    """The neural models' trainable parameter counts (matched to Mamba2's), if recorded."""
    counts = results.get("parameters") or {}
    if not counts:
        return ""
    rows = []
    for name, c in sorted(counts.items(), key=lambda kv: kv[1]["max"]):
        n = f"{c['min']:,}" if c["min"] == c["max"] else f"{c['min']:,} .. {c['max']:,}"
        rows.append(f"<tr>{_cell(_e(name), 'name')}{_cell(n)}</tr>")
    return (
        "<h2>Neural models' sizes</h2>"
        "<p class=\"note\">Trainable parameters: every baseline's width, then its MLP's "
        "hidden size, is chosen so that its count matches Mamba2's (to within 0.5%), so the "
        "comparison is one of sequence mixers, not of sizes.</p><table>"
        + _head(["model", "parameters"])
        + "".join(rows)
        + "</table>"
    )


def _page(
    results: dict, pngs: Mapping[str, bytes], backtest_table: pl.DataFrame | None, title: str
) -> str:
    models = set(results.get("models", MODELS))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        "<h2>Summary</h2>",
        _summary(results),
        "<h2>How to read this</h2>",
        f"<p>{_HOW_TO_READ}</p>",
        _parameters(results),
    ]
    for name, r in results.get("targets", {}).items():
        parts.append(_target_section(name, r, models))
    parts.append("<h2>Figures</h2>")
    if pngs:
        parts += [_figure_block(n, png) for n, png in pngs.items()]
    else:
        parts.append('<p class="note">No figures.</p>')
    parts.append("<h2>Backtest</h2>")
    parts.append(_backtest(backtest_table, models))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (Agg)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def render_html(
    results: dict,
    figures: Mapping[str, Figure],
    backtest_table: pl.DataFrame | None = None,
    title: str = "Mambacast evaluation",
) -> str:
    """A self-contained HTML page (inline CSS, figures as base64 PNG data URIs, no scripts) of
    `ml.evaluation.evaluate`'s results: a summary (test period, folds, rows, symbols, per
    target the best forecaster, the MCS and each model's tally), how to read it, per target
    the metrics of every forecaster sorted by loss (MCS members starred, models highlighted,
    seed mean +- std under seeded ones), the model comparisons with their verdicts and the
    non-overlapping subsample where present, then the figures in the given order and the
    backtest table. Every string from the inputs is HTML-escaped."""
    return _page(results, {n: figure_png(f) for n, f in figures.items()}, backtest_table, title)


def json_safe(value: object) -> object:
    """`value` with NaN / inf floats as None, numpy scalars and arrays as Python values, tuples
    as lists and dates as ISO strings, so `json.dumps(..., allow_nan=False)` accepts it."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


_FIGURE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename it over `path`, so a reader
    never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(
    folder: str | os.PathLike,
    results: dict,
    figures: Mapping[str, Figure],
    backtest_table: pl.DataFrame | None = None,
    title: str = "Mambacast evaluation",
) -> list[Path]:
    """Write `evaluation.html` (`render_html`), `evaluation.json` (the results, NaN as null)
    and `<name>.png` for each figure into `folder` (created if needed), each atomically.
    Figure names must be plain file names (letters, digits, `_`, `.`, `-`). Returns the paths
    written."""
    bad = [n for n in figures if not _FIGURE_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"figure names must be plain file names ([A-Za-z0-9_.-]); got {bad}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {n: figure_png(f) for n, f in figures.items()}
    written = []
    for name, png in pngs.items():
        written.append(out / f"{name}.png")
        _write_atomic(written[-1], png)
    text = json.dumps(json_safe(results), indent=1, allow_nan=False)
    written.append(out / "evaluation.json")
    _write_atomic(written[-1], text.encode("utf-8"))
    written.append(out / "evaluation.html")
    _write_atomic(written[-1], _page(results, pngs, backtest_table, title).encode("utf-8"))
    return written


def build_figures(
    results: dict, scored: pl.DataFrame, paths: pl.DataFrame, targets: TargetSpec
) -> dict[str, Figure]:
    """The report's figures: equity and drawdown of the stitched backtest, the reliability
    diagram, the p10-p90 band and the sigma forecasts against what was realized (for the first
    symbol, Bitcoin when present), and the metric chart of each headline target.

    scored: the long prediction table of the test rows joined with the labels."""
    figs: dict[str, Figure] = {}
    if paths.height:
        figs["equity"] = plot_equity_drawdown(
            paths, "Walk-forward backtest, every fold's test window"
        )
    done = {n for n, r in results["targets"].items() if r.get("metrics")}
    direction = f"direction_{targets.direction_horizon}"
    if direction in done:
        figs[f"reliability_{direction}"] = plot_reliability(results, direction)
    symbols = sorted(scored["symbol"].unique().to_list())
    symbol = next((s for s in symbols if s.startswith("BTC")), symbols[0])
    names = set(scored["forecaster"].unique().to_list())
    lo, hi = targets.quantile_columns
    model = next((m for m in MODELS if m in names), None)
    if model and f"quantiles_{targets.direction_horizon}" in done:
        figs[f"band_{symbol}_{model}"] = plot_band(
            scored, symbol, model, label=targets.quantile, lower=lo, upper=hi
        )
    sigma = [n for n in (*MODELS, "ewma", "garch", "har") if n in names]
    if sigma and f"sigma_{targets.sigma_window}" in done:
        figs[f"sigma_{symbol}"] = plot_sigma(scored, symbol, sigma, label=targets.sigma)
    for name in (
        direction,
        f"quantiles_{targets.direction_horizon}",
        f"sigma_{targets.sigma_window}",
        f"returns_{max(targets.return_horizons)}",
    ):
        if name in done:
            figs[f"metrics_{name}"] = plot_metric_table(results, name)
    return figs
