"""A pytest plugin for mutmut's runs only (`-p tests.test_mutation_compat` in [tool.mutmut]
pytest_add_cli_args; `make test` collects this file and finds no tests in it).

mutmut replaces every mutated function by a trampoline made with functools.wraps, which sets
`__wrapped__` in the function's __dict__. torch's LambdaLR.state_dict() saves the __dict__ of
each lr_lambda that is not a plain function (Trainer passes bound methods), so the checkpoint
would hold the original function and torch.save fails to pickle it ("not the same object as
ml.trainer.Trainer._lr_lambda"). Dropping that attribute from the two lr_lambda trampolines
gives them the empty __dict__ the real methods have.

mutmut runs a mutant's tests with -x in no particular order, so a mutant one fast test kills
often waits for a slow one first. The hook below orders them by the durations mutmut recorded in
its clean run (mutants/mutmut-stats.json): each file's tests fastest first, and the files by
their fastest test, so that module fixtures are still set up once per file.

Nothing happens outside mutants/."""

import json
import sys
from pathlib import Path


def pytest_configure(config):
    if "mutmut" not in sys.modules:
        return
    from ml.trainer import Trainer

    for name in ("_lr_lambda", "_loss_lr_lambda"):
        fn = getattr(Trainer, name)
        fn.__dict__.pop("__wrapped__", None)


def pytest_collection_modifyitems(session, config, items):
    stats = Path("mutmut-stats.json")  # mutmut runs pytest inside mutants/
    if "mutmut" not in sys.modules or not stats.exists():
        return
    try:
        duration = json.loads(stats.read_text()).get("duration_by_test", {})
    except (OSError, ValueError):
        return
    slowest = max(duration.values(), default=0.0) + 1.0  # a test without a record goes last

    def seconds(item) -> float:
        return duration.get(item.nodeid, slowest)

    first_of_file: dict[str, float] = {}
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        first_of_file[path] = min(first_of_file.get(path, slowest), seconds(item))

    def key(item) -> tuple[float, str, float]:
        path = item.nodeid.split("::", 1)[0]
        return first_of_file[path], path, seconds(item)

    items.sort(key=key)
