import os

import dagster as dg

# Ingest partitions: one calendar year (UTC) of bars, on-chain and macro rows per partition,
# from 1960 (FRED's series start in 1962, the stock indices in 1970) to the current year.
# Dagster records one event per partition and asset (~20 ms each on 2 cores), so a daily grain
# made a ten-year backfill spend a minute per asset in bookkeeping; a yearly one records 67
# events per asset for the whole history. The daily refresh still fetches and writes only the
# new days: it runs the current year's partition with `incremental` set on the sources (see
# assets/ingest.py), and the current year's window ends at today's 00:00 UTC (complete days).
ingest_partitions = dg.TimeWindowPartitionsDefinition(
    cron_schedule="0 0 1 1 *",
    fmt="%Y",
    start="1960",
    end_offset=1,
    timezone="UTC",
)

# A range of partitions runs as one run (the whole history is one run, not 67). Unpartitioned
# assets downstream carry the same policy so `dagster asset materialize --partition-range` can
# run the whole graph in that one run.
SINGLE_RUN = dg.BackfillPolicy.single_run()

# Walk-forward folds: one partition per test window. Yearly by default ("2021"); set
# MAMBACAST_FOLD_MONTHS to 6, 3 or 1 for half-yearly, quarterly or monthly windows ("2021-04").
# The current, incomplete window is a partition too: its test rows run to the newest bar.
FOLD_MONTHS = int(os.environ.get("MAMBACAST_FOLD_MONTHS", "12"))
if FOLD_MONTHS not in (1, 2, 3, 4, 6, 12):
    raise ValueError(f"MAMBACAST_FOLD_MONTHS={FOLD_MONTHS}: use 1, 2, 3, 4, 6 or 12")
fold_partitions = dg.TimeWindowPartitionsDefinition(
    cron_schedule="0 0 1 1 *" if FOLD_MONTHS == 12 else f"0 0 1 */{FOLD_MONTHS} *",
    fmt="%Y" if FOLD_MONTHS == 12 else "%Y-%m",
    start="2013" if FOLD_MONTHS == 12 else "2013-01",
    end_offset=1,
    timezone="UTC",
)
