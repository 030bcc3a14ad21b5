"""Imported by the forkserver of the forked executor (pipelines/definitions.py MULTIPROCESS), after
the asset modules and the defs folder: it builds `defs()` once, so every step process forked from
the server finds the definitions built instead of loading the assets package and the defs folder
again (~0.4 s a step on 2 cores). Nothing else imports it: loading the code location stays lazy."""

import sys

from pipelines.definitions import defs

try:
    defs()
except Exception as exc:  # each step's own load raises it again, with its traceback
    print(f"mambacast preload: building the definitions failed ({exc!r})", file=sys.stderr)
