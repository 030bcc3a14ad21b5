"""The defs folder `dg` autoloads (`[tool.dg.project]` in pyproject.toml): one module each for
the jobs, the schedules, the sensors and the resource bindings. The assets and checks live in
the top-level `assets` package, which `pipelines.definitions.defs` loads beside this folder.

Modules here import other project modules whole (`from pipelines.defs import jobs`), never the
definitions inside them: the autoloader collects every definition a module holds at its top
level, and an imported job or asset list would be collected twice."""
