"""The latest forecast of a trained sequence model, carried forward one refresh at a time.

A stateful model's forecast at bar t depends on every bar up to t through its recurrent state.
Recomputing it from the start of the history each day costs O(history); carrying the state
costs O(new bars): `carry_forward` keeps the state after each of the recent bars (a
"checkpoint") and, on the next refresh, runs the model from the newest checkpoint whose inputs
are still exactly the inputs of today's lanes over the bars after it only.

A checkpoint is valid when the lanes' inputs up to it are bit-for-bit those it was made from
(a digest of the calendar and the standardized inputs up to the checkpoint). An ingest that
revises the last days (the refresh re-reads an overlap) invalidates the checkpoints from the
first changed bar on, and the run restarts from an older one; a revision further back than
the oldest kept checkpoint, a new symbol or another model restarts from the beginning (and
says so). The newest bar is always computed again, so a re-run for the same bar replaces its
forecast with the same numbers.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from ml.forecasters.base import FoldData, TargetSpec
from ml.forecasters.neural import SequenceForecaster
from ml.sequence_data import LaneGroup
from ml.state import detach_state, flatten_state, unflatten_state
from ml.walkforward import Fold, assign_fold

STATE_FORMAT = 1
KEEP_CHECKPOINTS = 40  # bars of state kept per lane group: revisions up to this far back replay


@dataclass
class CarryResult:
    forecasts: pl.DataFrame  # symbol, as_of and the seed-mean prediction columns
    state: dict[str, Any]  # the checkpoints to save for the next run
    bars_run: int  # positions the model ran over (new bars, or the whole history)
    restarted: list[str]  # why a lane group started from the beginning, if one did


def live_fold_data(
    rows: pl.DataFrame, fold: Fold, columns: list[str], targets: TargetSpec
) -> FoldData:
    """A trained fold's view of today's rows (the dataset's layout, every bar to the newest):
    the inputs run to the newest bar instead of the fold's test end; the fold's split is kept
    only so that constants fitted on its training rows can be refitted where an older model
    did not save them."""
    return FoldData(
        key=fold.key,
        rows=assign_fold(rows, fold).sort(["symbol", "ts"]),
        bars=rows.select(["symbol", "ts", "open", "high", "low", "close"]).sort(["symbol", "ts"]),
        feature_columns=list(columns),
        targets=targets,
        fit_end=fold.fit_end,
        val_end=fold.val_end,
        inputs=rows.select(["symbol", "ts", *columns]).sort(["symbol", "ts"]),
    )


def _group_key(group: LaneGroup) -> str:
    return "|".join(group.symbols)


def _digest(group: LaneGroup, end: int) -> str:
    """The lanes' inputs over the first `end` positions, as a hash."""
    h = hashlib.sha256()
    h.update(_group_key(group).encode())
    h.update(group.calendar.head(end).dt.epoch("us").to_numpy().tobytes())
    h.update(np.ascontiguousarray(group.x[:, :end].numpy()).tobytes())
    h.update(np.ascontiguousarray(group.segment[:, :end].numpy() == -1).tobytes())
    return h.hexdigest()


def _resume(group: LaneGroup, checkpoints: list[dict]) -> dict | None:
    """The newest checkpoint before the group's last position whose inputs still match."""
    T = group.calendar.len()
    for ck in sorted(checkpoints, key=lambda c: c["pos"], reverse=True):
        pos = int(ck["pos"])
        if pos < T - 1 and _digest(group, pos + 1) == ck["digest"]:
            return ck
    return None


def seed_mean(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The seeds' mean prediction: sigma as the mixture's (root mean variance), the rest as
    plain means (as walkforward_run.seed_means does for the evaluation)."""
    out = {}
    for k in parts[0]:
        stack = np.stack([p[k] for p in parts])
        out[k] = np.sqrt((stack**2).mean(0)) if k == "sigma" else stack.mean(0)
    return out


def carry_forward(
    seeds: Sequence[SequenceForecaster],
    groups: Sequence[LaneGroup],
    targets: TargetSpec,
    saved: dict[str, Any] | None,
    fresh_from: Any = None,
    keep: int = KEEP_CHECKPOINTS,
) -> CarryResult:
    """Forecasts at every bar after the newest valid checkpoint (and at the newest bar always),
    from every seed of one model, averaged over the seeds.

    saved: the `state` of the previous CarryResult for this model (None: none yet).
    fresh_from: where a group has no valid checkpoint and runs from the beginning, forecasts
      are returned for its bars after this time only (the model's out-of-sample bars; None:
      only the newest bar).
    """
    known = (saved or {}).get("groups", {})
    frames, state_out, bars_run, restarted = [], {}, 0, []
    for group in groups:
        key, T = _group_key(group), group.calendar.len()
        checkpoints = list(known.get(key, []))
        ck = _resume(group, checkpoints)
        if ck is None:
            start, states = 0, [None] * len(seeds)
            restarted.append(
                f"{key}: no saved state" if not checkpoints else f"{key}: inputs changed"
            )
            checkpoints = []
        else:
            start = int(ck["pos"]) + 1
            states = [
                _on(s, f.settings.torch_device()) for s, f in zip(ck["states"], seeds, strict=True)
            ]
            checkpoints = [c for c in checkpoints if int(c["pos"]) <= int(ck["pos"])]
        # the bulk in training-sized chunks, then the last `keep` bars one at a time, keeping
        # the state after each as a checkpoint
        step_from = max(start, T - keep)
        outs: list[list[dict[str, np.ndarray]]] = [[] for _ in seeds]
        for i, f in enumerate(seeds):
            if step_from > start:
                out, states[i] = f.stream(group.x[:, start:step_from], states[i])
                outs[i].append(out)
        for pos in range(step_from, T):
            flat = []
            for i, f in enumerate(seeds):
                out, states[i] = f.stream(group.x[:, pos : pos + 1], states[i], chunk=1)
                outs[i].append(out)
                flat.append(_flat_cpu(states[i]))
            checkpoints.append(
                {
                    "pos": pos,
                    "ts": str(group.calendar[pos]),
                    "digest": _digest(group, pos + 1),
                    "states": flat,
                }
            )
        bars_run += T - start
        state_out[key] = sorted(checkpoints, key=lambda c: c["pos"])[-keep:]
        per_seed = [
            {k: np.concatenate([o[k] for o in parts], 1) for k in parts[0]} for parts in outs
        ]
        mean = seed_mean(per_seed)
        positions = np.arange(start, T)
        if ck is None:
            after = (
                group.calendar.gather(positions) > fresh_from
                if fresh_from is not None
                else positions == T - 1
            )
            after = np.asarray(after) | (positions == T - 1)
        else:
            after = np.ones(positions.size, dtype=bool)
        real = group.segment[:, start:].numpy() != -1  # a lane's own bars, not its holes
        for b, symbol in enumerate(group.symbols):
            keep_rows = np.flatnonzero(after & real[b])
            if keep_rows.size == 0:
                continue
            cols = seeds[0].columns(mean, b, keep_rows, targets)
            frames.append(
                pl.DataFrame(
                    {
                        "symbol": symbol,
                        "as_of": group.calendar.gather(positions[keep_rows]),
                        **cols,
                    }
                )
            )
    forecasts = (
        pl.concat(frames).with_columns(pl.col(pl.Float32).cast(pl.Float64))
        if frames
        else pl.DataFrame(schema={"symbol": pl.String, "as_of": pl.Datetime("us")})
    )
    return CarryResult(
        forecasts=forecasts,
        state={"format": STATE_FORMAT, "groups": state_out},
        bars_run=bars_run,
        restarted=restarted,
    )


def _flat_cpu(state: Any) -> dict[str, Any]:
    """A state flattened for a weights-only checkpoint, its tensors on the CPU (so it loads on
    any machine)."""
    flat = flatten_state(detach_state(state))
    flat["tensors"] = [t.cpu().clone() for t in flat["tensors"]]
    return flat


def _on(flat: dict[str, Any], device: torch.device) -> Any:
    """A saved (flattened) state rebuilt with its tensors on `device`."""
    return unflatten_state({**flat, "tensors": [t.to(device) for t in flat["tensors"]]})


def load_state(path: Path) -> dict[str, Any] | None:
    """The checkpoints saved at `path`, or None where there are none (or another format)."""
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved if isinstance(saved, dict) and saved.get("format") == STATE_FORMAT else None


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write the checkpoints atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = [
    "CarryResult",
    "carry_forward",
    "live_fold_data",
    "load_state",
    "save_state",
    "seed_mean",
]
