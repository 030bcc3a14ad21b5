"""The names of the sequence models, without importing torch.

`ml.forecasters.neural.SEQUENCE_MODELS` builds one model per name, in this order; the Dagster
definitions read the names from here to declare their assets without loading the models.
"""

MAMBA2 = "mamba2"
# the baselines at Mamba2's parameter count (ml.sequence_baselines)
SEQUENCE_BASELINE_NAMES = ("lstm", "gru", "transformer", "cnn_lstm")
SEQUENCE_MODEL_NAMES = (MAMBA2, *SEQUENCE_BASELINE_NAMES)
