import dagster as dg

# Daily UTC partitions: one partition is one calendar day of bars, on-chain and macro rows.
# The synthetic market starts on 2012-01-01; real sources may start later.
daily_partitions = dg.DailyPartitionsDefinition(start_date="2012-01-01", timezone="UTC")

# A range of partitions runs as one run (a ten-year backfill is one run, not 3,650). Unpartitioned
# assets downstream carry the same policy so `dagster asset materialize --partition-range` can
# run the whole graph in that one run.
SINGLE_RUN = dg.BackfillPolicy.single_run()
