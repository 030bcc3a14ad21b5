"""benchmarks/mutation.py's `--survivors` bookkeeping: a re-run of the last survivors replaces
only their results; every other mutant keeps the full run's."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mutation_module():
    spec = importlib.util.spec_from_file_location(
        "mutation_bench", ROOT / "benchmarks" / "mutation.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_survivors_rerun_keeps_the_full_runs_figures_for_every_other_mutant(
    tmp_path, monkeypatch
):
    mutation = _mutation_module()
    monkeypatch.setattr(mutation, "ROOT", tmp_path)
    meta = tmp_path / "mutants" / "warehouse" / "artifacts.py.meta"
    meta.parent.mkdir(parents=True)
    # after the re-run mutmut has results for the re-run names only (the rest unchecked: None)
    codes = {"m.a_1": 1, "m.a_2": 0, "m.a_3": 24, "m.a_4": None, "m.a_5": None}
    meta.write_text(json.dumps({"exit_code_by_key": codes}))
    old = {
        "file": "warehouse/artifacts.py",
        "mutants": 5,
        "killed": 2,
        "survived": 2,
        "timeout": 0,
        "skipped": 1,
        "suspicious": 0,
        "not_checked": 0,
        "survivors": [
            {"mutant": "m.a_1", "status": "survived"},
            {"mutant": "m.a_2", "status": "survived"},
            {"mutant": "m.a_3", "status": "skipped"},
        ],
    }
    new = {
        "file": "warehouse/artifacts.py",
        "mutants": 5,
        "killed": 1,
        "survived": 1,
        "timeout": 1,
        "skipped": 0,
        "suspicious": 0,
        "not_checked": 2,
        "mutmut_exit_code": 0,
        "survivors": [{"mutant": "m.a_2", "status": "survived"}],
    }
    merged = mutation._merge_rerun(old, new, ["m.a_1", "m.a_2", "m.a_3"])
    counts = {k: merged[k] for k in mutation._COUNTS}
    assert counts == {
        "killed": 2 - 0 + 1,  # m.a_4, m.a_5 (killed in the full run) and m.a_1 now
        "survived": 1,
        "timeout": 1,
        "skipped": 0,
        "suspicious": 0,
        "not_checked": 0,
    }
    assert sum(counts.values()) == old["mutants"]
    assert [s["mutant"] for s in merged["survivors"]] == ["m.a_2"]
    assert merged["complete"] is True
