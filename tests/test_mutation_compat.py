"""A pytest plugin for mutmut's runs only (`-p tests.test_mutation_compat` in [tool.mutmut]
pytest_add_cli_args; `make test` collects this file and finds no tests in it).

mutmut replaces every mutated function by a trampoline made with functools.wraps, which sets
`__wrapped__` in the function's __dict__. torch's LambdaLR.state_dict() saves the __dict__ of
each lr_lambda that is not a plain function (Trainer passes bound methods), so the checkpoint
would hold the original function and torch.save fails to pickle it ("not the same object as
ml.trainer.Trainer._lr_lambda"). Dropping that attribute from the two lr_lambda trampolines
gives them the empty __dict__ the real methods have. Nothing happens outside mutants/."""

import sys


def pytest_configure(config):
    if "mutmut" not in sys.modules:
        return
    from ml.trainer import Trainer

    for name in ("_lr_lambda", "_loss_lr_lambda"):
        fn = getattr(Trainer, name)
        fn.__dict__.pop("__wrapped__", None)
