import os

import dagster as dg

# Daily UTC partitions: one partition is one calendar day of bars, on-chain and macro rows.
# The synthetic market starts on 2012-01-01; real sources may start later.
daily_partitions = dg.DailyPartitionsDefinition(start_date="2012-01-01", timezone="UTC")

# A range of partitions runs as one run (a ten-year backfill is one run, not 3,650). Unpartitioned
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
