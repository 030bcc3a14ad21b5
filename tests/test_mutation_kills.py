"""Tests that kill mutants `make mutate` (benchmarks/mutation.py, mutmut) found surviving in the
guard modules: each pins a behaviour the existing tests left open. benchmarks/results/mutation.md
lists the mutant each one kills."""
