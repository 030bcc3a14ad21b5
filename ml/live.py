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
from ml.forecasters.neural import SEQUENCE_CODE_VERSION, SequenceForecaster
from ml.sequence_data import LaneGroup
from ml.state import detach_state, flatten_state, unflatten_state
from ml.walkforward import Fold, assign_fold

STATE_FORMAT = 1
# How far back a revised bar can be replayed from a saved state (the macro overlap is 30 days);
# the state after each of the newest DENSE bars is kept, and every DENSE-th one before
KEEP_CHECKPOINTS = 40
DENSE = 8


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


def _records(group: LaneGroup) -> np.ndarray:
    """The group's inputs as one byte record per position: its bar time, every lane's
    standardized inputs (the anchor channel included) and where the lanes have holes. A prefix
    of these rows is what a checkpoint's state was computed from."""
    T = group.calendar.len()
    cal = group.calendar.dt.epoch("us").to_numpy().astype("<i8").reshape(T, 1).view(np.uint8)
    x = np.ascontiguousarray(group.x.numpy().astype("<f4").transpose(1, 0, 2)).reshape(T, -1)
    holes = np.ascontiguousarray((group.segment.numpy() == -1).T).astype(np.uint8)
    return np.hstack([cal, x.view(np.uint8), holes])


class _Digests:
    """sha256 of the group's first n records (`_records`), for growing n, in one pass over the
    bytes."""

    def __init__(self, group: LaneGroup, records: np.ndarray) -> None:
        self.records = records
        self.hash = hashlib.sha256(_group_key(group).encode())
        self.n = 0

    def upto(self, end: int) -> str:
        if end < self.n:
            raise ValueError("digests are taken in increasing order")
        self.hash.update(self.records[self.n : end].tobytes())
        self.n = end
        return self.hash.copy().hexdigest()


def _resume(group: LaneGroup, records: np.ndarray, checkpoints: list[dict]) -> dict | None:
    """The newest checkpoint before the group's last position whose inputs still match (a
    revised bar invalidates every checkpoint from it on)."""
    T = group.calendar.len()
    digests, found = _Digests(group, records), None
    for ck in sorted(checkpoints, key=lambda c: c["pos"]):
        pos = int(ck["pos"])
        if pos >= T - 1 or digests.upto(pos + 1) != ck["digest"]:
            break
        found = ck
    return found


def _kept(pos: int, newest: int, keep: int) -> bool:
    """Which checkpoints are kept: every bar among the newest DENSE ones (the refresh's bar
    overlap), every DENSE-th bar back to `keep` bars (the on-chain and macro overlaps)."""
    back = newest - pos
    return back < DENSE or (back < keep and pos % DENSE == 0)


def seed_mean(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The seeds' mean prediction: sigma as the mixture's (root mean variance), the rest as
    plain means (as walkforward_run.seed_means does for the evaluation)."""
    out = {}
    for k in parts[0]:
        stack = np.stack([p[k] for p in parts])
        out[k] = np.sqrt((stack**2).mean(0)) if k == "sigma" else stack.mean(0)
    return out


def state_header(seeds: Sequence[SequenceForecaster]) -> dict[str, Any]:
    """What a saved state is only valid for: the code that made it, the device kind and the
    precision the model ran in, the seeds."""
    f = seeds[0]
    return {
        "format": STATE_FORMAT,
        "code_version": SEQUENCE_CODE_VERSION,
        "model": f.kind,
        "device": f.settings.torch_device().type,
        "precision": f.precision,
        "seeds": [x.seed for x in seeds],
    }


def carry_forward(
    seeds: Sequence[SequenceForecaster],
    groups: Sequence[LaneGroup],
    targets: TargetSpec,
    saved: dict[str, Any] | None,
    fresh_from: Any = None,
    keep: int = KEEP_CHECKPOINTS,
) -> CarryResult:
    """Forecasts of every seed of one model, averaged over the seeds, at the bars after the
    newest valid checkpoint that are new since the previous run (or the newest bar again when
    none is: a re-run replaces it), never at or before `fresh_from` (the model's validation
    end: older bars are not out of sample). Bars replayed after a revision are run for the
    state but not returned: their forecasts stay as first issued.

    saved: the `state` of the previous CarryResult for this model (None: none yet); ignored
      when its header (code, device kind, precision, seeds) differs from these seeds'.
    fresh_from: also where a group that starts from the beginning returns forecasts from
      (None: only its newest bar).
    A windowed model (stateful=False) has no state to carry: it is recomputed every time.
    """
    header = state_header(seeds)
    if saved is not None and saved.get("header") != header:
        saved, why = None, "saved state made by other code, device, precision or seeds"
    else:
        why = "no saved state"
    stateful = seeds[0].settings.stateful
    known = (saved or {}).get("groups", {}) if stateful else {}
    frames, state_out, bars_run, restarted = [], {}, 0, []
    for group in groups:
        key, T = _group_key(group), group.calendar.len()
        checkpoints = list(known.get(key, []))
        records = _records(group)
        ck = _resume(group, records, checkpoints)
        previous = max((int(c["pos"]) for c in checkpoints), default=-1)
        reason = why if not checkpoints else "inputs changed before the oldest checkpoint"
        if ck is not None:
            try:
                states = [
                    _on(s, f.settings.torch_device())
                    for s, f in zip(ck["states"], seeds, strict=True)
                ]
            except (TypeError, ValueError, KeyError, AttributeError, ImportError):
                ck, reason = None, "saved state unreadable"  # e.g. a state class changed
        if ck is None:
            start, states = 0, [None] * len(seeds)
            restarted.append(f"{key}: {reason if stateful else 'windowed model, recomputed'}")
            checkpoints, previous = [], -1
        else:
            start = int(ck["pos"]) + 1
            checkpoints = [c for c in checkpoints if int(c["pos"]) <= int(ck["pos"])]
        # the bulk in training-sized chunks, then the last `keep` bars one at a time, keeping
        # the states after some as checkpoints (a windowed model runs whole, as it predicts)
        step_from = max(start, T - keep) if stateful else T
        outs: list[list[dict[str, np.ndarray]]] = [[] for _ in seeds]
        for i, f in enumerate(seeds):
            if step_from > start:
                out, states[i] = f.stream(group.x[:, start:step_from], states[i])
                outs[i].append(out)
        digests = _Digests(group, records)
        for pos in range(step_from, T):
            for i, f in enumerate(seeds):
                out, states[i] = f.stream(group.x[:, pos : pos + 1], states[i], chunk=1)
                outs[i].append(out)
            digest = digests.upto(pos + 1)
            if _kept(pos, T - 1, keep):
                checkpoints.append(
                    {
                        "pos": pos,
                        "ts": str(group.calendar[pos]),
                        "digest": digest,
                        "states": [_flat_cpu(st) for st in states],
                    }
                )
        bars_run += T - start
        if stateful:
            state_out[key] = [c for c in checkpoints if _kept(int(c["pos"]), T - 1, keep)]
        per_seed = [
            {k: np.concatenate([o[k] for o in parts], 1) for k in parts[0]} for parts in outs
        ]
        mean = seed_mean(per_seed)
        positions = np.arange(start, T)
        times = group.calendar.gather(positions)
        if ck is None and fresh_from is None:
            wanted = positions == T - 1
        else:
            # the new bars (the newest again where none is new); replayed ones stay as issued
            wanted = (positions > previous) | (positions == T - 1)
            if fresh_from is not None:
                wanted &= np.asarray(times > fresh_from)
        real = group.segment[:, start:].numpy() != -1  # a lane's own bars, not its holes
        for b, symbol in enumerate(group.symbols):
            rows = np.flatnonzero(wanted & real[b])
            if rows.size == 0:
                continue
            cols = seeds[0].columns(mean, b, rows, targets)
            frames.append(pl.DataFrame({"symbol": symbol, "as_of": times.gather(rows), **cols}))
    forecasts = (
        pl.concat(frames).with_columns(pl.col(pl.Float32).cast(pl.Float64))
        if frames
        else pl.DataFrame(schema={"symbol": pl.String, "as_of": pl.Datetime("us")})
    )
    return CarryResult(
        forecasts=forecasts,
        state={"format": STATE_FORMAT, "header": header, "groups": state_out},
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
    """The checkpoints saved at `path`; None where there are none, or the file cannot be read
    (another format, a damaged file): the model then runs from the beginning, never fails."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a state is a cache: unreadable means absent
        return None
    return saved if isinstance(saved, dict) and saved.get("format") == STATE_FORMAT else None


def save_state(path: Path, state: dict[str, Any], root: Path | None = None) -> None:
    """Write the checkpoints atomically: a temporary file in the same folder, then a rename.

    The path is built from configuration (the model name) and an artifact version: a path
    with a `..` part, or one that resolves outside `root` (the forecast-state folder) when it
    is given, raises ValueError before anything is created."""
    path = Path(path)
    if ".." in path.parts or (
        root is not None and not path.resolve().is_relative_to(Path(root).resolve())
    ):
        raise ValueError(
            f"Refusing to write a forecast state at {str(path)!r}: it lies outside "
            f"{root if root is not None else 'its folder'}. Use a model name of letters, "
            "digits, . _ - (no '/', '..' or absolute path)."
        )
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
