"""Per-symbol sequences ("lanes") for stateful models, built without leaking the future.

Each symbol is one lane: its bars in time order. Lanes that trade on the same calendar (the
same weekdays: crypto every day, stocks on business days) form a group, and within a group
position t of every lane is the same bar time: the group's calendar is the union of its lanes'
bar times, and a lane without a bar at some time (before its first bar, after its last, a
missing day) has a hole there, an all-zero input without targets. Groups run separately, each
with its own state, so a stock's lane never sits beside BTC's at a different date and no
training step runs through another calendar's bars.

A "bar" is a bar of the symbol's own calendar: the 90-bar horizon of a business-day stock is 90
trading days (about 18 weeks), of BTC 90 calendar days.

Every bar is an input; only bars of the segment being fitted or scored carry targets, so a
model's state is warmed up on everything before them. Purged rows stay in as inputs without
targets. Features are standardized with statistics of the training rows only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from ml.dataset import TEST, TRAIN, VAL, Standardizer
from ml.trainer import Sequences

ANCHOR = "_log_sigma_anchor"
SEGMENT_CODE = {TRAIN: 1, VAL: 2, TEST: 3}  # 0: input only (warm-up, purged), -1: no bar (hole)


@dataclass
class LaneGroup:
    """Lanes of one calendar, aligned by bar time: position t is `calendar[t]` in every lane."""

    symbols: list[str]
    calendar: pl.Series  # the group's bar times, sorted
    x: torch.Tensor  # (B, T, F) standardized features, 0 where missing or a hole
    targets: dict[str, torch.Tensor]  # direction (B, T) int64 (-1 none); others float, NaN none
    segment: torch.Tensor  # (B, T) int8 codes, see SEGMENT_CODE

    def sequences(self, segment: str) -> Sequences | None:
        """Inputs up to the group's last bar of `segment`; targets on that segment only."""
        mask = self.segment == SEGMENT_CODE[segment]
        cols = torch.nonzero(mask.any(0))
        if cols.numel() == 0:
            return None
        end = int(cols.max()) + 1
        return Sequences(
            self.x[:, :end],
            {k: v[:, :end] for k, v in self.targets.items()},
            loss_mask=mask[:, :end],
        )

    def bars(self, lane: int) -> np.ndarray:
        """Positions of lane `lane`'s own bars (not its holes)."""
        return np.flatnonzero(self.segment[lane].numpy() != -1)


@dataclass
class Lanes:
    groups: list[LaneGroup]
    scaler: Standardizer  # fitted on every lane's training rows
    # per-lane scalers (each fitted on its own lane's training rows) when built with per_lane
    lane_scalers: dict[str, Standardizer] | None = None
    # the anchor's value before its first estimate, per lane (from the training rows only)
    anchor_fill: dict[str, float] | None = None

    @property
    def symbols(self) -> list[str]:
        return [s for g in self.groups for s in g.symbols]

    def sequences(self, segment: str) -> list[Sequences]:
        """One `Sequences` per group that has `segment` rows (see LaneGroup.sequences)."""
        out = [s for g in self.groups if (s := g.sequences(segment)) is not None]
        if not out:
            raise ValueError(f"No {segment} rows in any lane")
        return out


def calendar_key(ts: pl.Series) -> tuple[int, ...]:
    """The weekdays a lane trades on: (1..7) for crypto, (1..5) for business-day stocks."""
    return tuple(sorted(ts.dt.weekday().unique().to_list()))


def build_lanes(
    features: pl.DataFrame,
    labels: pl.DataFrame,
    splits: pl.DataFrame,
    feature_columns: list[str],
    horizons: tuple[int, ...],
    direction_col: str,
    quantile_col: str,
    sigma_col: str,
    scaler: Standardizer | None = None,
    per_lane: bool = False,
    lane_scalers: dict[str, Standardizer] | None = None,
    anchor: pl.DataFrame | None = None,
    anchor_fill: dict[str, float] | None = None,
) -> Lanes:
    """features/labels: per (symbol, ts); splits: (symbol, ts, split) of the rows with a segment.

    The scaler is fitted on the training rows unless one is given (for inference). With
    `per_lane`, each lane is standardized with its own training rows' statistics instead (the
    global scaler for a lane without training rows); `lane_scalers` gives them for inference.

    anchor: (symbol, ts, log_sigma), a log volatility estimate known at each bar (from past
    returns only); when given, it becomes the inputs' last channel, unstandardized (carried
    forward over its gaps, before its first value the median over the lane's training rows,
    or `anchor_fill` as fitted; 0 in holes).
    """
    rows = (
        features.select(["symbol", "ts", *feature_columns])
        .join(labels, on=["symbol", "ts"], how="left")
        .join(splits.select(["symbol", "ts", "split"]), on=["symbol", "ts"], how="left")
        .sort(["symbol", "ts"])
    )
    if anchor is not None:
        rows = rows.join(
            anchor.select("symbol", "ts", pl.col("log_sigma").alias(ANCHOR)),
            on=["symbol", "ts"],
            how="left",
        ).with_columns(
            pl.when(pl.col(ANCHOR).is_finite()).then(pl.col(ANCHOR)).forward_fill().over("symbol")
        )
        if anchor_fill is None:  # fitted here: from the training rows, never later ones
            train = rows.filter((pl.col("split") == TRAIN) & pl.col(ANCHOR).is_not_null())
            overall = float(train[ANCHOR].median()) if train.height else 0.0
            per = dict(train.group_by("symbol").agg(pl.col(ANCHOR).median()).iter_rows())
            anchor_fill = {s: float(per.get(s, overall)) for s in rows["symbol"].unique()}
        else:  # as fitted; a symbol the fit never saw gets the fitted lanes' median
            known = list(anchor_fill.values())
            other = float(np.median(known)) if known else 0.0
            anchor_fill = {
                **{s: other for s in rows["symbol"].unique() if s not in anchor_fill},
                **anchor_fill,
            }
        fills = pl.DataFrame(
            {"symbol": list(anchor_fill), "_fill": list(anchor_fill.values())},
            schema={"symbol": rows.schema["symbol"], "_fill": pl.Float64},
        )
        rows = (
            rows.join(fills, on="symbol", how="left")
            .with_columns(pl.col(ANCHOR).fill_null(pl.col("_fill")).fill_null(0.0))
            .drop("_fill")
        )
    if scaler is None:
        scaler = Standardizer.fit(rows.filter(pl.col("split") == TRAIN), feature_columns)
    symbols = rows["symbol"].unique(maintain_order=True).to_list()
    per_symbol = {s: rows.filter(pl.col("symbol") == s) for s in symbols}
    if per_lane and lane_scalers is None:
        lane_scalers = {}
        for s in symbols:
            own = per_symbol[s].filter(pl.col("split") == TRAIN)
            if not own.is_empty():
                lane_scalers[s] = Standardizer.fit(own, feature_columns)
    scalers = {s: (lane_scalers or {}).get(s, scaler) if per_lane else scaler for s in symbols}
    by_calendar: dict[tuple[int, ...], list[str]] = {}
    for s in symbols:
        by_calendar.setdefault(calendar_key(per_symbol[s]["ts"]), []).append(s)
    groups = [
        _group(
            [per_symbol[s] for s in members],
            members,
            horizons,
            direction_col,
            quantile_col,
            sigma_col,
            [scalers[s] for s in members],
        )
        for members in by_calendar.values()
    ]
    return Lanes(
        groups=groups,
        scaler=scaler,
        lane_scalers=lane_scalers if per_lane else None,
        anchor_fill=anchor_fill,
    )


def _group(
    frames: list[pl.DataFrame],
    symbols: list[str],
    horizons: tuple[int, ...],
    direction_col: str,
    quantile_col: str,
    sigma_col: str,
    scalers: list[Standardizer],
) -> LaneGroup:
    calendar = pl.concat([g["ts"] for g in frames]).unique().sort()
    B, T, F, H = len(frames), calendar.len(), len(scalers[0].columns), len(horizons)
    anchored = ANCHOR in frames[0].columns
    x = np.zeros((B, T, F + anchored), dtype=np.float32)
    direction = np.full((B, T), -1, dtype=np.int64)
    returns = np.full((B, T, H), np.nan, dtype=np.float32)
    quant = np.full((B, T), np.nan, dtype=np.float32)
    sigma = np.full((B, T), np.nan, dtype=np.float32)
    segment = np.full((B, T), -1, dtype=np.int8)
    for b, (g, scaler) in enumerate(zip(frames, scalers, strict=True)):
        pos = calendar.search_sorted(g["ts"]).to_numpy()  # each bar's place on the calendar
        x[b, pos, :F] = np.nan_to_num(scaler.transform(g), nan=0.0)
        if anchored:
            x[b, pos, F] = np.nan_to_num(g[ANCHOR].to_numpy().astype(np.float64), nan=0.0)
        d = g[direction_col].to_numpy()
        direction[b, pos] = np.where(np.isnan(d.astype(float)), -1, d).astype(np.int64)
        for j, h in enumerate(horizons):
            returns[b, pos, j] = g[f"fwd_ret_{h}"].to_numpy().astype(np.float32)
        quant[b, pos] = g[quantile_col].to_numpy().astype(np.float32)
        sigma[b, pos] = g[sigma_col].to_numpy().astype(np.float32)
        segment[b, pos] = (
            g["split"].replace_strict(SEGMENT_CODE, default=0, return_dtype=pl.Int8).to_numpy()
        )
    return LaneGroup(
        symbols=symbols,
        calendar=calendar,
        x=torch.from_numpy(x),
        targets={
            "direction": torch.from_numpy(direction),
            "returns": torch.from_numpy(returns),
            "quantiles": torch.from_numpy(quant),
            "sigma": torch.from_numpy(sigma),
        },
        segment=torch.from_numpy(segment),
    )
