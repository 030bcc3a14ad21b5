"""Ablations of the Mamba2 recipe, scored on validation rows only (never the test rows).

    python benchmarks/ablations.py --data-dir data-evaluate --folds 2022 2023 2024 --seeds 0 1
    python benchmarks/ablations.py --data-dir data --folds 2022 2023 2024 --variants default pooled_norm

Reads the training dataset a `make evaluate` (or `make demo`) run left in the data directory's
lake. Each fold's validation window is cut in two: the model early-stops on the first half and
is scored on the second (the test rows of the fold are never read: the data is cut at the
fold's test start). The purge between the halves is the walk-forward one: no early-stopping row
has a label window reaching the scored half. For every (variant, fold, seed) Mamba2 is fitted
on the fold's training rows and scored next to climatology and EWMA(0.94) on the same rows.
Variants:

  default      the current defaults (stateful TBPTT over the whole history, each lane
               standardized with its own training rows, every input, the tiny preset)
  windowed     the state restarts every tbptt_len bars: a windowed encoder
  pooled_norm  one scaler fitted on every lane's training rows together
  no_onchain   without the on-chain inputs
  baseline     the baseline preset (d_model 256, 4 layers) instead of tiny
  no_anchor    heads in absolute units instead of units of EWMA volatility
  monitor_total  early stopping on the sum of log task losses instead of direction log loss
  lr_5e-4      a quarter of the default learning rate

Prints a table and writes benchmarks/results/ablations_<name>.json. docs/ABLATIONS.md reports
the figures and the defaults chosen from them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml.dataset import TEST  # noqa: E402
from ml.forecasters import REGISTRY, TargetSpec, fold_data  # noqa: E402
from ml.forecasters.neural import SequenceForecaster, SequenceSettings  # noqa: E402
from ml.labels import LabelConfig  # noqa: E402
from ml.metrics import log_loss_per_row, pinball_per_row, sigma_qlike_per_row  # noqa: E402
from ml.walkforward import Fold  # noqa: E402
from warehouse import DataPaths, Lake  # noqa: E402

VARIANTS: dict[str, dict] = {
    "default": {},
    "windowed": {"stateful": False},
    "pooled_norm": {"lane_norm": False},
    "no_onchain": {"onchain": False},
    "baseline": {"preset": "baseline"},
    "no_anchor": {"sigma_anchor": False},
    "monitor_total": {"monitor": "total"},
    "lr_5e-4": {"lr": 5e-4},
}
BASELINES = ("climatology", "ewma")


def score(pred: pl.DataFrame, rows: pl.DataFrame, t: TargetSpec) -> dict[str, float]:
    """Validation-row figures of one forecaster's predictions (only the columns it has)."""
    df = rows.join(pred, on=["symbol", "ts"], how="inner", suffix="_pred")
    out: dict[str, float] = {"rows": float(df.height)}
    probs = ["p_down", "p_flat", "p_up"]
    if all(c in df.columns for c in probs) and df[probs[0]].null_count() < df.height:
        d = df.drop_nulls([t.direction, *probs])
        out["direction_log_loss"] = float(
            log_loss_per_row(d[t.direction].to_numpy(), d.select(probs).to_numpy()).mean()
        )
    if "sigma" in df.columns and df["sigma"].null_count() < df.height:
        s = df.drop_nulls([t.sigma, "sigma"]).filter(pl.col(t.sigma) > 0)
        out["sigma_qlike"] = float(
            sigma_qlike_per_row(s[t.sigma].to_numpy(), s["sigma"].to_numpy()).mean()
        )
    lo, hi = t.quantile_columns
    if lo in df.columns and df[lo].null_count() < df.height:
        q = df.drop_nulls([t.quantile, lo, hi])
        y = q[t.quantile].to_numpy()
        levels = t.quantile_levels
        out["pinball"] = float(
            (
                pinball_per_row(y, q[lo].to_numpy(), levels[0])
                + pinball_per_row(y, q[hi].to_numpy(), levels[-1])
            ).mean()
        )
        out["coverage"] = float(((y >= q[lo].to_numpy()) & (y <= q[hi].to_numpy())).mean())
    return out


def validation_fold(fold: Fold) -> Fold:
    """The fold with its validation window split: early stopping on the first half, the
    second half as the scored window; nothing at or after the fold's test start."""
    half = (fold.test_start - fold.val_start) / 2
    mid = fold.val_start + half
    return Fold(
        f"{fold.key}-val", fold.train_start, fold.val_start, mid, fold.test_start, fold.embargo
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data-evaluate")
    ap.add_argument("--folds", nargs="+", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--epochs", type=int, default=SequenceSettings().epochs)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default=None, help="results file suffix (default: the data dir)")
    args = ap.parse_args()

    lake = Lake(DataPaths.at(args.data_dir).lake)
    meta = lake.read_meta("training_dataset")
    rows = lake.read("training_dataset")
    targets = TargetSpec.from_label_config(LabelConfig.from_dict(meta["label_config"]))
    folds = {f["key"]: Fold.from_json(f) for f in meta["folds"]}
    unknown = [k for k in args.folds if k not in folds]
    if unknown:
        raise SystemExit(f"folds {unknown} not in the dataset; it has {list(folds)}")
    base = SequenceSettings(epochs=args.epochs, threads=args.threads)
    results: list[dict] = []
    started = time.perf_counter()
    for key in args.folds:
        data = fold_data(rows, rows, validation_fold(folds[key]), meta["feature_columns"], targets)
        val = data.rows.filter(pl.col("split") == TEST)  # the second half of validation
        for name in BASELINES:
            pred = REGISTRY[name]().fit(data).predict(data)
            results.append({"fold": key, "model": name, "seed": None, **score(pred, val, targets)})
        for variant in args.variants:
            settings = replace(base, **VARIANTS[variant])
            for seed in args.seeds:
                t0 = time.perf_counter()
                f = SequenceForecaster("mamba2", seed, settings).fit(data)
                pred = f.predict(data)
                figures = score(pred, val, targets)
                results.append(
                    {
                        "fold": key,
                        "model": f"mamba2/{variant}",
                        "seed": seed,
                        "seconds": round(time.perf_counter() - t0, 1),
                        "parameters": f.summary["parameters"],
                        **figures,
                    }
                )
                print(
                    f"fold {key} {variant:<10} seed {seed}: "
                    + ", ".join(f"{k} {v:.4f}" for k, v in figures.items() if k != "rows")
                    + f" ({results[-1]['seconds']} s)",
                    flush=True,
                )
    table = (
        pl.DataFrame(results)
        .group_by("model", maintain_order=True)
        .agg(
            pl.col("direction_log_loss").mean(),
            pl.col("sigma_qlike").mean(),
            pl.col("pinball").mean(),
            pl.col("coverage").mean(),
            pl.col("rows").sum().alias("scored_rows"),
        )
    )
    with pl.Config(tbl_rows=50, tbl_cols=10, float_precision=4):
        print(table)
    name = args.name or Path(args.data_dir).name
    out = ROOT / "benchmarks" / "results" / f"ablations_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "data_version": meta["version"],
                "folds": args.folds,
                "seeds": args.seeds,
                "settings": asdict(base),
                "scored_on": "the second half of each fold's validation window (early stopping "
                "on the first half; never the fold's test rows)",
                "machine": f"{platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} torch threads",
                "seconds": round(time.perf_counter() - started, 1),
                "summary": table.to_dicts(),
                "runs": results,
            },
            indent=2,
            default=str,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
