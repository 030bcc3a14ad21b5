"""Nested recurrent states (tensors inside dataclasses, lists, tuples, dicts): detaching them
for truncated BPTT, and flattening them to plain tensors for weights-only checkpoints."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch


def detach_state(state: Any) -> Any:
    """The same nested state (tensors in dataclasses, lists, tuples, dicts) cut from the graph."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.replace(
            state,
            **{
                f.name: detach_state(getattr(state, f.name))
                for f in dataclasses.fields(state)
                if f.init
            },
        )
    if isinstance(state, (list, tuple)):
        return type(state)(detach_state(s) for s in state)
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    return state


def flatten_state(state: Any) -> dict[str, Any]:
    """A nested state as {"tensors": [...], "spec": ...} of tensors and plain values only,
    so it can be saved and loaded with torch.load(weights_only=True)."""
    tensors: list[torch.Tensor] = []

    def spec(s: Any) -> Any:
        if s is None:
            return None
        if isinstance(s, torch.Tensor):
            tensors.append(s.detach().cpu())
            return ["t", len(tensors) - 1]
        if dataclasses.is_dataclass(s) and not isinstance(s, type):
            cls = type(s)
            return [
                "dc",
                f"{cls.__module__}:{cls.__qualname__}",
                {f.name: spec(getattr(s, f.name)) for f in dataclasses.fields(s) if f.init},
            ]
        if isinstance(s, (list, tuple)):
            return ["list" if isinstance(s, list) else "tuple", [spec(v) for v in s]]
        if isinstance(s, dict):
            return ["dict", {k: spec(v) for k, v in s.items()}]
        if isinstance(s, (int, float, bool, str)):
            return ["v", s]
        raise TypeError(f"cannot checkpoint a recurrent state containing {type(s).__name__}")

    return {"spec": spec(state), "tensors": tensors}


def unflatten_state(flat: dict[str, Any]) -> Any:
    tensors = flat["tensors"]

    def build(s: Any) -> Any:
        if s is None:
            return None
        kind = s[0]
        if kind == "t":
            return tensors[s[1]]
        if kind == "dc":
            module, qualname = s[1].split(":")
            cls = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"checkpoint names {s[1]}, which is not a dataclass")
            return cls(**{k: build(v) for k, v in s[2].items()})
        if kind in ("list", "tuple"):
            items = [build(v) for v in s[1]]
            return items if kind == "list" else tuple(items)
        if kind == "dict":
            return {k: build(v) for k, v in s[1].items()}
        return s[1]

    return build(flat["spec"])
