"""The code location: `defs()` is what `dg dev`, `dg launch`, `dg check defs`, `dagster dev`,
the webserver and `dagster asset materialize -m pipelines.definitions` load.

It is the defs folder `pipelines/defs/` (`[tool.dg.project]` in pyproject.toml), autoloaded, and
the executor (forked step processes with the project preloaded, or in_process). The folder holds
one module each for the assets and checks (`project_assets.py`: the top-level `assets` package
loaded whole, so a module added there is in the graph by being there), the jobs, the schedules,
the sensors and the resource bindings. Nothing here lists assets or checks.
"""

from __future__ import annotations

import functools
import pkgutil
from pathlib import Path
from types import ModuleType

import dagster as dg

import assets
import pipelines.defs as defs_folder

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def modules_of(package: ModuleType) -> list[str]:
    """Every module of `package`, by name, found without importing them."""
    return sorted(f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__))


# Step processes fork from a server that has already imported the project (every asset module,
# the defs folder), so a step starts without re-importing dagster and polars (~2.5 s on 2
# cores). Great Expectations is preloaded too: every quality check needs it and it takes ~3 s to import, once
# instead of once per check. The training stacks (torch, LightGBM, scipy, matplotlib) are not
# preloaded: the few steps using them import them.
# Three at a time lets steps run side by side; DuckDB writers are serialized across runs by the
# `duckdb_writer` concurrency pool (and the warehouse's file lock), not by the executor.
MULTIPROCESS = {
    "max_concurrent": 3,
    "start_method": {
        "forkserver": {
            "preload_modules": [
                *modules_of(assets),
                *modules_of(defs_folder),
                "pipelines.preload",  # last: builds defs() from the modules above
                "great_expectations",
            ]
        }
    },
}
executor = dg.multi_or_in_process_executor.configured(
    lambda cfg: {"in_process": {}} if cfg["in_process"] else {"multiprocess": MULTIPROCESS},
    name="mambacast_executor",
    config_schema={
        "in_process": dg.Field(
            bool,
            default_value=False,
            description="Run every step in the run's process, one after another, instead of "
            "forked step processes (faster for runs of many small steps)",
        )
    },
    description="Forked step processes (three at a time, the project preloaded), or in_process",
)


@functools.cache
def project_definitions(executor_def: dg.ExecutorDefinition) -> dg.Definitions:
    """The project's assets, checks, jobs, schedules, sensors and resources with `executor_def`
    (the Kubernetes code location passes its own; pipelines/k8s_definitions.py).

    Built once per process (~0.4 s): the forkserver builds it before forking the step processes
    (pipelines/preload.py), so a step finds it built. A code server's reload (the UI's Reload,
    `dg dev` restarting a location) is a new process. The cache ignores Dagster's load context
    (initialization or a run's reconstruction, pinned component state): nothing in the defs
    folder is state-backed, so every context builds the same definitions. A state-backed
    component (dbt, Fivetran) added there would need the cache keyed by that context."""
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=PROJECT_ROOT),
        dg.Definitions(executor=executor_def),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return project_definitions(executor)
