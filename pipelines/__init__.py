"""Wiring only: the Definitions, jobs, schedules, partitions and resources."""
