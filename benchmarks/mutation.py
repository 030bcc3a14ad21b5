"""Mutation testing of the guard modules (`make mutate`): mutmut over ml/leakage.py,
warehouse/{store,lake,artifacts}.py, warehouse/sources/http.py and ml/trainer.py's checkpoint
functions, each mutant run against only the tests that called the mutated function.

    python benchmarks/mutation.py                  # every module, one worker
    python benchmarks/mutation.py lake leakage     # some modules (the others keep their last figures)
    python benchmarks/mutation.py --max-children 2 # both cores (a machine of its own)
    python benchmarks/mutation.py --survivors      # re-run only the last run's survivors and
                                                   # skipped mutants against today's tests

mutmut's configuration is [tool.mutmut] in pyproject.toml; survivors explained as equivalent or
benign are in benchmarks/mutation.toml. Writes benchmarks/results/mutation.{json,md}: per module
the mutants, killed, survived, timeout, skipped (no test reaches the function) and seconds, and
every survivor with file:line, the mutation and its explanation (or "UNEXPLAINED")."""

from __future__ import annotations

import argparse
import ast
import fnmatch
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXPLAINED = ROOT / "benchmarks" / "mutation.toml"
MUTMUT = Path(sys.executable).parent / "mutmut"
SEP = "ǁ"  # mutmut's separator in a method's mutant name: module.xǁClassǁmethod__mutmut_N

_TRAINER_CHECKPOINT = (
    "save_checkpoint",
    "_write_checkpoint",
    "_resume",
    "load_checkpoint",
    "_restore",
    "_carried_shards",
    "_join_carried",
)
# module key -> (source file, mutant-name globs mutmut runs)
MODULES: dict[str, tuple[str, list[str]]] = {
    "leakage": ("ml/leakage.py", ["ml.leakage.*"]),
    "store": ("warehouse/store.py", ["warehouse.store.*"]),
    "lake": ("warehouse/lake.py", ["warehouse.lake.*"]),
    "artifacts": ("warehouse/artifacts.py", ["warehouse.artifacts.*"]),
    "http": ("warehouse/sources/http.py", ["warehouse.sources.http.*"]),
    "trainer": (
        "ml/trainer.py",
        [f"ml.trainer.x{SEP}Trainer{SEP}{f}__mutmut_*" for f in _TRAINER_CHECKPOINT],
    ),
}

# The tests each module's mutants run (mutmut narrows them further to the tests that called the
# mutated function). [tool.mutmut] in pyproject.toml lists all of them for a plain `mutmut run`;
# a module's run gets only its own, so its recorded clean run and its slowest mutants stay short.
_COMMON = ["tests/test_mutation_kills.py"]
# the Dagster runs of tests/test_leakage.py (a materialized graph, 12 s of fixture and 2 to 5 s
# each) test the asset checks' wiring, not ml/leakage.py's rules, which its unit tests cover
_LEAKAGE_GRAPH_TESTS = (
    "test_clean_pipeline_passes_every_leakage_check",
    "test_a_leaky_feature_blocks_everything_downstream",
    "test_stored_features_leak_in_the_asset_code_path_blocks_training",
)
MODULE_TESTS: dict[str, list[str]] = {
    "leakage": [
        "tests/test_leakage.py",
        "tests/test_leakage_guards.py",
        *[a for t in _LEAKAGE_GRAPH_TESTS for a in ("--deselect", f"tests/test_leakage.py::{t}")],
    ],
    "store": [
        "tests/test_store.py",
        "tests/test_store_guards.py",
        "tests/test_kill.py",
        "tests/test_security.py",
    ],
    "lake": [
        "tests/test_lake.py",
        "tests/test_lake_guards.py",
        "tests/test_lake_write_guards.py",
        "tests/test_atomic_rewrite.py",
        "tests/test_security.py",
    ],
    "artifacts": [
        "tests/test_artifacts.py",
        "tests/test_artifacts_guards.py",
        "tests/test_atomic_rewrite.py",
        "tests/test_security.py",
    ],
    "http": ["tests/test_source_http.py", "tests/test_security.py"],
    "trainer": [
        "tests/test_trainer.py",
        "tests/test_trainer_save_guards.py",
        "tests/test_trainer_restore_guards.py",
        "tests/test_security.py",
    ],
}


def _selection(key: str) -> list[str]:
    """[tool.mutmut]'s test selection with its test files replaced by the module's own."""
    from mutmut.configuration import config

    rest = [a for a in config().pytest_add_cli_args_test_selection if not a.endswith(".py")]
    return [*MODULE_TESTS[key], *_COMMON, *rest]


def _mutmut_run(key: str, max_children: int) -> int:
    """In this process: mutmut's `run` for one module with its own test selection."""
    import dataclasses

    import mutmut.configuration as mc
    from mutmut.__main__ import _run

    mc._config = dataclasses.replace(
        mc.config(), pytest_add_cli_args_test_selection=_selection(key)
    )
    names = os.environ.get(_NAMES_ENV, "").split()
    try:
        _run(names or MODULES[key][1], max_children)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


# `--survivors`: the mutant names the module's run re-runs, whitespace-separated
_NAMES_ENV = "MAMBACAST_MUTANTS"


# mutmut exit codes (mutmut.stats.status_by_exit_code) folded into the summary's columns
KILLED = {1, 3}
SURVIVED = {0}
TIMEOUT = {-24, 24, 152, 255, 36}
SKIPPED = {5, 33, 34}  # no test covers the function / skipped


def _status(code: int | None) -> str:
    if code in KILLED:
        return "killed"
    if code in SURVIVED:
        return "survived"
    if code in TIMEOUT:
        return "timeout"
    if code in SKIPPED:
        return "skipped"
    if code is None:
        return "not_checked"
    return "suspicious"


def _function_lines(path: Path) -> dict[str, int]:
    """'func' or 'Class.method' -> line of its `def`."""
    lines: dict[str, int] = {}
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines[node.name] = node.lineno
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines[f"{node.name}.{sub.name}"] = sub.lineno
    return lines


def _function_of(mutant: str) -> str:
    """'warehouse.lake.xǁLakeǁread__mutmut_3' -> 'Lake.read'; 'ml.leakage.x_f__mutmut_1' -> 'f'."""
    last = mutant.rsplit("__mutmut_", 1)[0]
    if SEP in last:
        _, cls, meth = last.split(SEP)
        return f"{cls}.{meth}"
    return last.rsplit(".", 1)[1][2:]  # drop the "x_" prefix


def _diff(mutant: str, source: Path) -> str:
    """mutmut's diff of one mutant: in this process (a `mutmut show` per survivor cost a
    second each), else through the command line."""
    try:
        from mutmut.mutation.diff_apply import get_diff_for_mutant

        cwd = Path.cwd()
        os.chdir(ROOT)
        try:
            return get_diff_for_mutant(mutant, path=source)
        finally:
            os.chdir(cwd)
    except Exception:  # another mutmut layout: its command line
        return subprocess.run(
            [str(MUTMUT), "show", mutant], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout


def _describe(mutant: str, source: Path, def_lines: dict[str, int]) -> dict:
    """file:line and the changed line(s) of one mutant, from `mutmut show`."""
    diff = _diff(mutant, source)
    removed, added, offset, pos = [], [], None, 0
    for line in diff.splitlines():
        if line.startswith(("---", "+++", "#")):
            continue
        if line.startswith("@@"):
            pos = int(line.split()[1].split(",")[0].lstrip("-")) - 1
            continue
        if line.startswith("-"):
            offset = pos if offset is None else offset
            removed.append(line[1:].strip())
            pos += 1
        elif line.startswith("+"):
            added.append(line[1:].strip())
        else:
            pos += 1
    func = _function_of(mutant)
    start = def_lines.get(func)
    line = start + offset if start is not None and offset is not None else None
    if start is not None and removed:  # the changed line itself, if the source moved since
        text = (ROOT / source).read_text().splitlines()
        hits = [i + 1 for i in range(start - 1, len(text)) if text[i].strip() == removed[0]]
        line = hits[0] if hits else line
    return {
        "mutant": mutant,
        "function": func,
        "location": f"{source}:{line}" if line else str(source),
        "original": " / ".join(removed),
        "mutated": " / ".join(added),
    }


def run_module(key: str, max_children: int, names: list[str] | None = None) -> dict:
    """mutmut over one module: every mutant, or only `names` (the others keep their results)."""
    source, globs = MODULES[key]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env[_NAMES_ENV] = " ".join(names or [])
    digest = hashlib.sha256((ROOT / source).read_bytes()).hexdigest()[:16]
    script = [sys.executable, __file__, "--max-children", str(max_children), "--mutmut-run", key]
    what = f"{len(names)} named mutants" if names else " ".join(globs)
    print(f"== {key}: mutmut run {what} ({source})", flush=True)
    start = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(["nice", "-n", "19", *script], cwd=ROOT, env=env, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    result = summarize(key, round(time.monotonic() - start, 1), proc.returncode)
    result["cpu_seconds"] = round(cpu, 1)
    result["source_sha256"] = digest
    result["tests"] = _selection(key)
    return result


def summarize(key: str, seconds: float, returncode: int, run_at: str | None = None) -> dict:
    """One module's figures and survivors from mutmut's results in mutants/."""
    source, globs = MODULES[key]
    meta = json.loads((ROOT / "mutants" / f"{source}.meta").read_text())
    codes = {
        name: code
        for name, code in meta["exit_code_by_key"].items()
        if any(fnmatch.fnmatchcase(name, g) for g in globs)
    }
    counts = dict.fromkeys(
        ("killed", "survived", "timeout", "skipped", "suspicious", "not_checked"), 0
    )
    for code in codes.values():
        counts[_status(code)] += 1
    explained = _explanations()
    def_lines = _function_lines(ROOT / source)
    survivors = []
    for name in sorted(codes, key=_natural):
        if _status(codes[name]) in ("survived", "suspicious", "skipped"):
            d = _describe(name, Path(source), def_lines)
            d["status"] = _status(codes[name])
            d["explanation"] = explained.get(name, "UNEXPLAINED")
            survivors.append(d)
    return {
        "file": source,
        "mutants": len(codes),
        **counts,
        "seconds": seconds,
        "mutmut_exit_code": returncode,
        "complete": returncode == 0 and counts["not_checked"] == 0,
        "run_at": run_at or datetime.now(UTC).isoformat(timespec="seconds"),
        "survivors": survivors,
    }


_COUNTS = ("killed", "survived", "timeout", "skipped", "suspicious", "not_checked")


def _merge_rerun(old: dict, new: dict, names: list[str]) -> dict:
    """The full run `old` with the re-run of its survivors `names` (`new`, summarized from
    mutants/, where mutmut leaves every other mutant of the file unchecked when the tests have
    changed) in place of their old results: the other mutants keep the full run's."""
    rerun = set(names)
    merged = {**new, **{k: old[k] for k in _COUNTS}}
    for s in old["survivors"]:
        merged[s["status"]] -= 1
    codes = json.loads((ROOT / "mutants" / f"{old['file']}.meta").read_text())["exit_code_by_key"]
    for name in names:
        merged[_status(codes.get(name))] += 1
    merged["survivors"] = [s for s in new["survivors"] if s["mutant"] in rerun]
    merged["complete"] = new["mutmut_exit_code"] == 0 and merged["not_checked"] == 0
    return merged


def _natural(name: str) -> tuple[str, int]:
    head, _, n = name.rpartition("__mutmut_")
    return head, int(n) if n.isdigit() else 0


def _explanations() -> dict[str, str]:
    if not EXPLAINED.exists():
        return {}
    return dict(tomllib.loads(EXPLAINED.read_text()).get("explained", {}))


def write_summary(results: dict, max_children: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    explained = _explanations()  # benchmarks/mutation.toml as it is now, for every module
    for m in results["modules"].values():
        for s in m["survivors"]:
            s["explanation"] = explained.get(s["mutant"], "UNEXPLAINED")
    (RESULTS / "mutation.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    mods = results["modules"]
    lines = [
        "# Mutation testing of the guard modules",
        "",
        f"Tool: mutmut {results['mutmut_version']} (config: `[tool.mutmut]` in pyproject.toml), "
        f"`make mutate` / `python benchmarks/mutation.py`. Each mutant runs only the tests that "
        f"called its function in mutmut's recorded clean run. Workers: {max_children}, under "
        "`nice -n 19`.",
        "",
        "| module | file | status | mutants | killed | survived | timeout | skipped | seconds | CPU s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in MODULES:
        m = mods.get(key)
        if m is None:
            lines.append(f"| {key} | {MODULES[key][0]} | **not yet run** | | | | | | | |")
            continue
        state = "done" if m["complete"] else f"**incomplete** ({m['not_checked']} not checked)"
        lines.append(
            f"| {key} | {m['file']} | {state} | {m['mutants']} | {m['killed']} | "
            f"{m['survived']} | {m['timeout']} | {m['skipped']} | {m['seconds']} | "
            f"{m.get('cpu_seconds', '')} |"
        )
    not_run = [k for k in MODULES if k not in mods or not mods[k]["complete"]]
    lines += [
        "",
        "Run complete for every module."
        if not not_run
        else f"**Partial run**: not done yet: {', '.join(not_run)}.",
        "",
        "`skipped`: no selected test calls the function (mutmut's 'no tests'). `seconds` is wall "
        "time, `CPU s` the CPU time of mutmut and its workers; each includes the module's clean run "
        "that records which of its tests call which function.",
        "",
    ]
    notes = tomllib.loads(EXPLAINED.read_text()).get("notes", []) if EXPLAINED.exists() else []
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    for key, m in mods.items():
        if m.get("note"):
            lines += [f"{key}: {m['note']}", ""]
        if r := m.get("survivors_rerun"):
            lines += [
                f"{key}: the full run's survivors and skipped mutants ({r['mutants']}) re-run "
                f"against the tests as they are now (`--survivors`), {r['seconds']} s, "
                f"{r['run_at']}; the counts above are after that re-run, the seconds the full "
                "run's.",
                "",
            ]
    for key, m in mods.items():
        if not m["survivors"]:
            continue
        lines += [f"## Survivors: {key} ({m['file']})", ""]
        lines += ["| mutant | where | mutation | status | why |", "|---|---|---|---|---|"]
        for s in m["survivors"]:
            change = f"`{s['original']}` → `{s['mutated']}`".replace("|", "\\|")
            lines.append(
                f"| {s['mutant'].rsplit('.', 1)[-1]} | {s['location']} | {change} | "
                f"{s['status']} | {s['explanation']} |"
            )
        lines.append("")
    (RESULTS / "mutation.md").write_text("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    ap.add_argument("--max-children", type=int, default=1, help="mutmut workers (default 1)")
    ap.add_argument(
        "--fresh", action="store_true", help="delete mutants/ first (after a source change)"
    )
    ap.add_argument(
        "--summarize-only",
        action="store_true",
        help="run nothing: rewrite the summary of the modules already run from mutants/",
    )
    ap.add_argument(
        "--survivors",
        action="store_true",
        help="re-run only the mutants the last run left alive (survived, skipped, suspicious)",
    )
    ap.add_argument("--mutmut-run", metavar="MODULE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mutmut_run:
        return _mutmut_run(args.mutmut_run, args.max_children)
    keys = args.modules or list(MODULES)
    if unknown := set(keys) - set(MODULES):
        ap.error(f"unknown modules {sorted(unknown)}; choose from {list(MODULES)}")
    if args.fresh:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    elif not args.summarize_only:
        # mutmut copies a file only when mutants/ lacks it: refresh the tests (new kill tests)
        shutil.rmtree(ROOT / "mutants" / "tests", ignore_errors=True)
    previous = RESULTS / "mutation.json"
    results = json.loads(previous.read_text()) if previous.exists() else {"modules": {}}
    from importlib.metadata import version

    results["mutmut_version"] = version("mutmut")
    results["python"] = sys.version.split()[0]
    results["cpus"] = os.cpu_count()
    for key in keys:
        if args.summarize_only:
            if key not in results["modules"]:
                continue
            old = results["modules"][key]
            new = summarize(key, old["seconds"], old["mutmut_exit_code"], old["run_at"])
            results["modules"][key] = {**old, **new}  # keeps cpu_seconds, tests, note
        elif args.survivors:
            old = results["modules"].get(key)
            if old is None:
                print(f"== {key}: no earlier run, so no survivors to re-run", flush=True)
                continue
            names = [s["mutant"] for s in old["survivors"]]
            if not names:
                continue
            digest = hashlib.sha256((ROOT / MODULES[key][0]).read_bytes()).hexdigest()[:16]
            if old.get("source_sha256") != digest:
                # mutant numbers shift with the source: the old names may be other mutants now
                print(f"== {key}: {MODULES[key][0]} changed since its full run: a full run")
                results["modules"][key] = run_module(key, args.max_children)
            else:
                new = _merge_rerun(old, run_module(key, args.max_children, names), names)
                # the figures of the full run stand; the re-run's time is reported beside them
                new["survivors_rerun"] = {
                    "mutants": len(names),
                    "seconds": new["seconds"],
                    "cpu_seconds": new["cpu_seconds"],
                    "run_at": new["run_at"],
                }
                for k in ("seconds", "cpu_seconds", "run_at", "tests"):
                    new[k] = old.get(k, new[k])
                results["modules"][key] = new
        else:
            results["modules"][key] = run_module(key, args.max_children)
        results["modules"] = {k: results["modules"][k] for k in MODULES if k in results["modules"]}
        write_summary(results, args.max_children)  # after each module: a partial run still shows
        m = results["modules"][key]
        print(
            f"== {key}: {m['mutants']} mutants, {m['killed']} killed, {m['survived']} survived, "
            f"{m['timeout']} timeout, {m['skipped']} skipped, {m['seconds']} s",
            flush=True,
        )
    results["total_seconds"] = round(sum(m["seconds"] for m in results["modules"].values()), 1)
    write_summary(results, args.max_children)
    unexplained = [
        s["mutant"]
        for m in results["modules"].values()
        for s in m["survivors"]
        if s["explanation"] == "UNEXPLAINED"
    ]
    print(f"wrote {RESULTS / 'mutation.md'}; unexplained survivors: {len(unexplained)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
