"""What a forked step pays before its work: loading the code location.

    python benchmarks/step_load.py [--root DIR] [--children 7] [--out benchmarks/results/step_load.json]

The forked executor's forkserver imports its preload modules (pipelines/definitions.py
MULTIPROCESS) once; every step process is forked from it and then loads the code location's
repository and its asset job. This times that load in children forked from a process that
imported the preload modules, with the preload as configured and without `pipelines.preload`
(the module that builds `defs()` in the forkserver), so the saving is measured, not assumed.
`--root` points at another checkout (an older commit) to compare with; its own preload list is
used. Prints the figures and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import importlib, json, os, sys, time
sys.path.insert(0, os.getcwd())
import pipelines.definitions as d
skip = set(sys.argv[2:])
preload = [m for m in d.MULTIPROCESS["start_method"]["forkserver"]["preload_modules"]
           if m not in skip]
t0 = time.perf_counter()
for m in preload:
    importlib.import_module(m)
preload_s = time.perf_counter() - t0
loads = []
for _ in range(int(sys.argv[1])):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        t = time.perf_counter()
        import pipelines.definitions as dd
        defs = dd.defs() if callable(dd.defs) else dd.defs  # a module-level Definitions before
        defs.get_repository_def().get_implicit_global_asset_job_def()
        os.write(w, repr(time.perf_counter() - t).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    loads.append(float(os.read(r, 64)))
print(json.dumps({"preload": preload, "preload_seconds": preload_s, "load_seconds": loads}))
"""


def measure(root: Path, children: int, skip: tuple[str, ...] = ()) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(children), *skip],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    loads = sorted(got["load_seconds"])
    return {
        "preload_modules": len(got["preload"]),
        "forkserver_preload_seconds": round(got["preload_seconds"], 2),
        "step_load_median_seconds": round(loads[len(loads) // 2], 3),
        "step_load_max_seconds": round(loads[-1], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT), help="the checkout to measure")
    ap.add_argument("--children", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_load.json"))
    args = ap.parse_args()
    root = Path(args.root).resolve()
    result = {
        "benchmark": "step_load",
        "root": str(root),
        "preloaded": measure(root, args.children),
    }
    if (root / "pipelines" / "preload.py").is_file():
        result["without_building_defs"] = measure(root, args.children, ("pipelines.preload",))
    for name, r in result.items():
        if isinstance(r, dict):
            print(
                f"{name:<24} forkserver preload {r['forkserver_preload_seconds']:>6.2f} s, "
                f"step load median {r['step_load_median_seconds']:.3f} s "
                f"(max {r['step_load_max_seconds']:.3f} s)"
            )
    result["machine"] = (
        f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
