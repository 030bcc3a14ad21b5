"""Mamba2 speed and memory: training throughput against LSTM and full causal attention, TBPTT
memory over a long series, and streaming step() against recomputing a window.

    python benchmarks/mamba.py [--preset baseline] [--d-model N] [--lengths 1024,4096,16384]
        [--steps-short 16384 --steps-long 262144 --tbptt-len 1024] [--out PATH]

Figures (batch 1, float32 on CPU; on CUDA the Trainer's default bf16 autocast is not used either,
so the backends are compared on the same numbers):
- tokens_per_s: forward + backward tokens/s of the Forecaster (Mamba2, torch backend), an LSTM
  and a causal transformer (SDPA, full attention over L: its window covers the whole sequence),
  and (--models) Mamba1 (pure-PyTorch selective scan), S4D (FFT convolution) and, on request,
  the windowed attention-LSTM, the baselines from ml.sequence_baselines at the Forecaster's
  parameter count. A run whose
  time, extrapolated from the previous length (linear; quadratic for attention), would pass
  --max-run-seconds is skipped, as is one that runs out of memory; the reason is recorded.
- tbptt_peak_mem_ratio: peak memory of TBPTT training (the trainer's chunk loop: forward with the
  carried state, loss, backward, clip, AdamW step, detach) over --steps-long steps divided by the
  same over --steps-short, each above the memory in use before the loop. CPU: each length in a
  fresh subprocess; peak RSS from /proc/self/status VmHWM after resetting it through
  /proc/self/clear_refs (ru_maxrss where that is not allowed). CUDA: torch.cuda.max_memory_allocated.
  Chunks are generated on the fly, so the data's own size does not grow with the series.
- step_vs_recompute_speedup: median time of recomputing the forward over a --step-window window
  divided by the median time of one streaming step() (no grad, batch 1).
- CUDA only: fused_vs_torch (fused over torch backend tokens/s, per length) and peak VRAM of the
  baseline and sparse_mhsa presets in forward + backward; null with "skipped": "no CUDA" on CPU.

The last stdout line is the whole result as one JSON object; it is also written to
benchmarks/results/mamba_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ml.backbone import BackboneConfig, Forecaster, MultiTaskLoss, count_parameters  # noqa: E402
from ml.sequence_baselines import SequenceBaseline, SequenceBaselineConfig  # noqa: E402
from ml.trainer import detach_state  # noqa: E402

N_FEATURES = 32
TARGETS = {
    "tbptt_peak_mem_ratio": ("<=", 1.1),
    "step_vs_recompute_speedup": (">=", 100.0),
    "fused_vs_torch": ("torch backend >= 0.5x fused: torch/fused >=", 0.5),
    "mamba_vs_attention_at_16384": (">=", 3.0),
}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def forward_backward(model: torch.nn.Module, x: torch.Tensor) -> None:
    outputs, _ = model(x)
    sum(v.float().mean() for v in outputs.values()).backward()  # every head gets a gradient
    model.zero_grad(set_to_none=True)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(err)


def backbone_config(args: argparse.Namespace, **overrides: Any) -> BackboneConfig:
    sizes = {"d_model": args.d_model} if args.d_model else {}
    return BackboneConfig.preset(args.preset, N_FEATURES, **{**sizes, **overrides})


# --------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------


def throughput(
    models: dict[str, torch.nn.Module],
    lengths: list[int],
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[dict[str, dict[str, float | None]], dict[str, str]]:
    """name -> {L: forward+backward tokens/s}, and why each missing entry was skipped."""
    rates: dict[str, dict[str, float | None]] = {name: {} for name in models}
    skipped: dict[str, str] = {}
    for name, model in models.items():
        forward_backward(model, torch.randn(1, 256, N_FEATURES, device=device))  # warm-up
        previous: tuple[int, float] | None = None
        for length in lengths:
            key = f"{name}@{length}"
            if previous is not None:
                exponent = 2 if "attention" in name or "transformer" in name else 1
                estimate = previous[1] * (length / previous[0]) ** exponent * args.repeats
                if estimate > args.max_run_seconds:
                    rates[name][str(length)] = None
                    skipped[key] = (
                        f"estimated {estimate:.0f} s for {args.repeats} repeats "
                        f"(from L={previous[0]}) > --max-run-seconds {args.max_run_seconds:g}"
                    )
                    print(f"  {key}: skipped ({skipped[key]})", flush=True)
                    continue
            x = torch.randn(1, length, N_FEATURES, device=device)
            try:
                times = [
                    timed(lambda m=model, x=x: forward_backward(m, x), device)
                    for _ in range(args.repeats)
                ]
            except (RuntimeError, MemoryError) as err:
                if not is_oom(err):
                    raise
                rates[name][str(length)] = None
                skipped[key] = f"out of memory: {str(err).splitlines()[0][:200]}"
                print(f"  {key}: skipped ({skipped[key]})", flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            median = statistics.median(times)
            rates[name][str(length)] = length / median
            previous = (length, median)
            print(f"  {key}: {length / median:10.0f} tokens/s ({median:.2f} s)", flush=True)
    return rates, skipped


# --------------------------------------------------------------------------------------------
# TBPTT memory
# --------------------------------------------------------------------------------------------


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def tbptt_run(args: argparse.Namespace, steps: int, device: torch.device) -> dict[str, Any]:
    """Train `steps` steps per lane in chunks of --tbptt-len; peak memory above the start."""
    torch.manual_seed(0)
    cfg = BackboneConfig.preset(args.tbptt_preset, N_FEATURES)
    model = Forecaster(cfg).to(device)
    loss_fn = MultiTaskLoss(cfg.quantiles).to(device)
    params = [*model.parameters(), *loss_fn.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device).manual_seed(1)
    lanes, length = args.tbptt_lanes, args.tbptt_len

    method: str
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        method = "torch.cuda.max_memory_allocated - memory_allocated before the loop"
    else:
        before = _rss_kib("VmRSS") * 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            method = "VmHWM (reset via /proc/self/clear_refs) - VmRSS before the loop"
        except OSError:
            method = "ru_maxrss - VmRSS before the loop (peak may predate the loop)"

    state = None
    start = time.perf_counter()
    for _ in range(math.ceil(steps / length)):
        x = torch.randn(lanes, length, N_FEATURES, device=device, generator=gen)
        returns = 0.01 * torch.randn(lanes, length, len(cfg.horizons), device=device, generator=gen)
        targets = {
            "direction": torch.randint(0, 3, (lanes, length), device=device, generator=gen),
            "quantiles": returns[..., 0],
            "sigma": returns[..., 1].abs() + 1e-3,
            "returns": returns,
        }
        outputs, state = model(x, state)
        loss, _ = loss_fn(outputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state = detach_state(state)
    sync(device)
    seconds = time.perf_counter() - start

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    elif "VmHWM" in method:
        peak = _rss_kib("VmHWM") * 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "steps": steps,
        "seconds": round(seconds, 2),
        "bytes_before": before,
        "peak_bytes": peak,
        "growth_bytes": peak - before,
        "method": method,
    }


def tbptt_memory(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    runs = {}
    for label, steps in (("short", args.steps_short), ("long", args.steps_long)):
        if device.type == "cuda":
            runs[label] = tbptt_run(args, steps, device)
        else:  # a fresh process each, so one run's peak cannot hide the other's
            cmd = [sys.executable, __file__, "--tbptt-worker", str(steps), *worker_flags(args)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[label] = json.loads(out.strip().splitlines()[-1])
        r = runs[label]
        print(
            f"  {label}: {steps} steps in {r['seconds']:.1f} s, peak {r['peak_bytes'] / 2**20:.1f}"
            f" MiB, growth {r['growth_bytes'] / 2**20:.1f} MiB",
            flush=True,
        )
    ratio = runs["long"]["growth_bytes"] / max(1, runs["short"]["growth_bytes"])
    return {
        "ratio": ratio,
        "absolute_peak_ratio": runs["long"]["peak_bytes"] / runs["short"]["peak_bytes"],
        "preset": args.tbptt_preset,
        "tbptt_len": args.tbptt_len,
        "lanes": args.tbptt_lanes,
        "loop": "ml.trainer's chunk loop (forward, loss, backward, clip, AdamW, detach_state)",
        "runs": runs,
    }


def worker_flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--tbptt-preset={args.tbptt_preset}",
        f"--tbptt-len={args.tbptt_len}",
        f"--tbptt-lanes={args.tbptt_lanes}",
        f"--threads={torch.get_num_threads()}",
        "--device=cpu",
    ]


# --------------------------------------------------------------------------------------------
# Streaming step vs recompute
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def step_vs_recompute(
    model: Forecaster, window: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    model.eval()
    x = torch.randn(1, window, N_FEATURES, device=device)
    _, state = model(x)  # the state a live stream would hold after `window` bars
    x_t = torch.randn(1, N_FEATURES, device=device)
    for _ in range(3):
        model.step(x_t, state)  # warm-up
    step_times = [timed(lambda: model.step(x_t, state), device) for _ in range(args.step_repeats)]
    full_times = [timed(lambda: model(x), device) for _ in range(args.recompute_repeats)]
    model.train()
    step_s, full_s = statistics.median(step_times), statistics.median(full_times)
    print(f"  step {step_s * 1e3:.2f} ms, recompute {window} {full_s * 1e3:.0f} ms", flush=True)
    return {
        "speedup": full_s / step_s,
        "window": window,
        "step_median_s": step_s,
        "recompute_median_s": full_s,
        "step_repeats": args.step_repeats,
        "recompute_repeats": args.recompute_repeats,
    }


# --------------------------------------------------------------------------------------------
# CUDA only: fused vs torch backend, peak VRAM
# --------------------------------------------------------------------------------------------


def cuda_figures(
    args: argparse.Namespace, lengths: list[int], device: torch.device
) -> dict[str, Any]:
    torch.manual_seed(0)
    fused = Forecaster(backbone_config(args, backend="fused")).to(device)
    torch_backend = Forecaster(backbone_config(args, backend="torch")).to(device)
    torch_backend.load_state_dict(fused.state_dict())
    try:
        rates, skipped = throughput({"fused": fused, "torch": torch_backend}, lengths, args, device)
    except RuntimeError as err:  # mamba_ssm missing or broken: say so, keep the other figures
        return {"fused_vs_torch": None, "fused_skipped": str(err)[:300], "peak_vram_bytes": {}}
    ratios = {
        L: (rates["torch"][L] / rates["fused"][L])  # type: ignore[operator]
        if rates["torch"].get(L) and rates["fused"].get(L)
        else None
        for L in rates["fused"]
    }
    del fused, torch_backend
    vram: dict[str, dict[str, int | None]] = {}
    for preset in ("baseline", "sparse_mhsa"):
        model = Forecaster(BackboneConfig.preset(preset, N_FEATURES)).to(device)
        vram[preset] = {}
        for length in lengths:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            try:
                forward_backward(model, torch.randn(1, length, N_FEATURES, device=device))
                vram[preset][str(length)] = torch.cuda.max_memory_allocated(device)
            except torch.OutOfMemoryError:
                vram[preset][str(length)] = None
        del model
    return {
        "fused_vs_torch": ratios,
        "backend_tokens_per_s": rates,
        "backend_skipped": skipped,
        "peak_vram_bytes": vram,
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--preset", default="baseline", help="Forecaster preset for throughput/step")
    ap.add_argument("--d-model", type=int, default=0, help="override the preset's d_model")
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument(
        "--models",
        default="mamba1,s4d",
        help="models timed beside mamba2, lstm and transformer_sdpa: mamba1, s4d, attention_lstm "
        "(comma-separated; '' none). attention_lstm runs an LSTM over a 64-bar window at every "
        "position: at the baseline preset and L=16384 its activations alone need ~20 GB",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed forward+backward per length")
    ap.add_argument("--max-run-seconds", type=float, default=300.0)
    ap.add_argument("--steps-short", type=int, default=16_384)
    ap.add_argument("--steps-long", type=int, default=262_144)
    ap.add_argument("--tbptt-len", type=int, default=1024)
    ap.add_argument("--tbptt-lanes", type=int, default=1)
    ap.add_argument("--tbptt-preset", default="tiny")
    ap.add_argument("--step-window", type=int, default=4096)
    ap.add_argument("--step-repeats", type=int, default=50)
    ap.add_argument("--recompute-repeats", type=int, default=3)
    ap.add_argument("--out", default="", help="default benchmarks/results/mamba_<device>.json")
    ap.add_argument("--tbptt-worker", type=int, default=0, help=argparse.SUPPRESS)
    return ap.parse_args()


def target_check(name: str, value: float | None) -> dict[str, Any]:
    op, bound = TARGETS[name]
    met = None if value is None else (value <= bound if op == "<=" else value >= bound)
    return {"target": f"{op} {bound:g}", "value": value, "met": met}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if args.tbptt_worker:
        print(json.dumps(tbptt_run(args, args.tbptt_worker, device)))
        return
    lengths = [int(v) for v in args.lengths.split(",") if v]
    args.models = [m for m in args.models.split(",") if m]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "mamba",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }

    # Mamba2 and the baselines at its parameter count
    torch.manual_seed(0)
    bb = backbone_config(args, backend="torch")
    models: dict[str, torch.nn.Module] = {"mamba2": Forecaster(bb)}
    models["lstm"] = SequenceBaseline(SequenceBaselineConfig.like(bb, "lstm"))
    # window >= L - 1: every query attends to its whole past, i.e. full causal attention
    models["transformer_sdpa"] = SequenceBaseline(
        SequenceBaselineConfig.like(bb, "transformer", attn_window=max(lengths))
    )
    # the other state-space layers (pure PyTorch scans) and the windowed attention-LSTM
    for kind in ("mamba1", "s4d", "attention_lstm"):
        if kind in args.models:
            models[kind] = SequenceBaseline(SequenceBaselineConfig.like(bb, kind))  # type: ignore[arg-type]
    for model in models.values():
        model.to(device)
    config = {
        "preset": args.preset,
        "d_model": bb.d_model,
        "n_layers": bb.n_layers,
        "n_features": N_FEATURES,
        "batch": 1,
        "dtype": "float32",
        "mamba2_backend": "torch",
        "lengths": lengths,
        "repeats": args.repeats,
        "max_run_seconds": args.max_run_seconds,
        "parameters": {name: count_parameters(m) for name, m in models.items()},
        "baseline_d_model": {name: m.cfg.d_model for name, m in models.items() if name != "mamba2"},
        "attention": "causal SDPA (is_causal), RoPE, window >= L: full attention over L",
    }
    result["config"] = config
    print(
        f"device {device} ({result['device_name']}), torch {torch.__version__}, "
        f"{result['threads']} threads; params {config['parameters']}",
        flush=True,
    )

    print("forward+backward tokens/s, batch 1:", flush=True)
    rates, skipped = throughput(models, lengths, args, device)
    result["tokens_per_s"] = rates
    result["tokens_per_s_skipped"] = skipped
    longest = str(max(lengths))
    mamba_rate, attn_rate = rates["mamba2"].get(longest), rates["transformer_sdpa"].get(longest)
    result[f"mamba_vs_attention_at_{longest}"] = (
        mamba_rate / attn_rate if mamba_rate and attn_rate else None
    )

    print(f"TBPTT peak memory ({args.tbptt_preset}, tbptt_len {args.tbptt_len}):", flush=True)
    tbptt = tbptt_memory(args, device)
    result["tbptt_peak_mem_ratio"] = tbptt.pop("ratio")
    result["tbptt"] = tbptt

    print(f"streaming step vs recomputing {args.step_window} steps:", flush=True)
    step = step_vs_recompute(models["mamba2"], args.step_window, args, device)  # type: ignore[arg-type]
    result["step_vs_recompute_speedup"] = step.pop("speedup")
    result["step"] = step

    if device.type == "cuda":
        del models
        torch.cuda.empty_cache()
        cuda = cuda_figures(args, lengths, device)
        result["fused_vs_torch"] = cuda.pop("fused_vs_torch")
        result["peak_vram_bytes"] = cuda.pop("peak_vram_bytes")
        result["cuda"] = cuda
    else:
        result["fused_vs_torch"] = None
        result["peak_vram_bytes"] = None
        result["skipped"] = "no CUDA: fused_vs_torch and peak_vram_bytes need a GPU"

    fused = result["fused_vs_torch"]
    fused_at_longest = fused.get(longest) if isinstance(fused, dict) else None
    result["targets"] = {
        "tbptt_peak_mem_ratio": target_check(
            "tbptt_peak_mem_ratio", result["tbptt_peak_mem_ratio"]
        ),
        "step_vs_recompute_speedup": target_check(
            "step_vs_recompute_speedup", result["step_vs_recompute_speedup"]
        ),
        "fused_vs_torch": target_check("fused_vs_torch", fused_at_longest),
        "mamba_vs_attention_at_16384": target_check(
            "mamba_vs_attention_at_16384", result.get("mamba_vs_attention_at_16384")
        ),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)

    print("targets:", flush=True)
    for name, t in result["targets"].items():
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"  {name}: {value} (target {t['target']}): {verdict}", flush=True)

    out = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / f"mamba_{device.type}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
