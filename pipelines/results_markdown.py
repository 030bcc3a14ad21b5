"""The README's results tables from an evaluation report:

    python -m pipelines.results_markdown reports/evaluation.json

Prints one Markdown table per target (every forecaster on the same test rows, sorted by the
target's primary loss; neural models as their seed-mean forecast with the mean +- std of the
single seeds beside it; "90% MCS": not significantly worse than the best at 90%), after the
neural models' parameter counts, then each
neural model's comparisons with the baselines (Diebold-Mariano, Holm-adjusted), and the
backtest's total returns.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = {
    "direction": ("log_loss", "brier", "balanced_accuracy", "macro_f1"),
    "quantiles": ("pinball_q10", "pinball_q90", "coverage", "winkler"),
    "sigma": ("qlike", "mse_var", "mz_r2"),
    "returns": ("mse", "mae", "rank_ic", "hit_rate"),
}
HIGHLIGHT = ("mamba2", "lightgbm")


def _fmt(v: object) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def target_table(t: dict) -> str:
    kind = next(k for k in COLUMNS if t["target"].startswith(k))
    cols = [c for c in COLUMNS[kind] if any(c in m for m in t["metrics"].values())]
    rows = sorted(t["metrics"].items(), key=lambda kv: kv[1]["loss"])
    mcs = set(t["mcs"]["included"]) if t.get("mcs") else set()
    lines = [
        f"**{t['target']}** ({t['rows']} rows, {t['period'][0]} .. {t['period'][1]}):",
        "",
        "| forecaster | " + " | ".join(cols) + " | 90% MCS |",
        "|---|" + "---|" * (len(cols) + 1),
    ]
    for name, m in rows:
        cells = [_fmt(m.get(c)) for c in cols]
        seeds = t.get("seeds", {}).get(name)
        if seeds and seeds.get("seeds"):
            first = cols[0]
            values = [s[first] for s in seeds["seeds"] if s.get(first) is not None]
            if values:
                mean = sum(values) / len(values)
                std = (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5
                cells[0] += f" (seeds {mean:.4g} ± {std:.2g})"
        label = f"**{name}**" if name in HIGHLIGHT else name
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'yes' if name in mcs else ''} |")
    return "\n".join(lines)


def comparisons(t: dict, model: str = "mamba2") -> str:
    rows = [c for c in t.get("comparisons", []) if c["model"] == model]
    if not rows:
        return ""
    out = [
        f"{model} vs baselines on {t['target']} (mean loss difference, negative favours "
        f"{model}; 95% block-bootstrap interval; DM p-value Holm-adjusted):",
        "",
    ]
    for c in rows:
        out.append(
            f"- {c['baseline']}: {c['mean_diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}],"
            f" p = {c.get('dm_p_holm', c['dm_p_value']):.3g}"
        )
    return "\n".join(out)


def parameters_table(report: dict) -> str:
    """The neural models' trainable parameter counts, smallest first."""
    counts = report.get("parameters") or {}
    if not counts:
        return ""
    lines = ["| model | parameters |", "|---|---|"]
    for name, c in sorted(counts.items(), key=lambda kv: kv[1]["max"]):
        n = f"{c['min']:,}" if c["min"] == c["max"] else f"{c['min']:,} .. {c['max']:,}"
        lines.append(f"| {name} | {n} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--targets", nargs="*", default=None, help="e.g. direction_90 sigma_30")
    args = ap.parse_args()
    report = json.loads(args.report.read_text())
    targets = report["targets"]
    sizes = parameters_table(report)
    if sizes:
        print(sizes)
        print()
    for name in args.targets or list(targets):
        print(target_table(targets[name]))
        print()
        text = comparisons(targets[name])
        if text:
            print(text)
            print()
    bt = report.get("backtest", {}).get("metrics", [])
    if bt:
        print("| symbol | strategy | total return | sharpe | max drawdown | turnover/yr |")
        print("|---|---|---|---|---|---|")
        for r in bt:
            print(
                f"| {r['symbol']} | {r['strategy']} | {r['total_return']:+.1%} | "
                f"{r['sharpe']:.2f} | {r['max_drawdown']:.0%} | {r['turnover_per_year']:.1f} |"
            )


if __name__ == "__main__":
    main()
