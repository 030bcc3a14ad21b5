"""The names of the sequence models, without importing torch.

`ml.forecasters.neural.SEQUENCE_MODELS` builds one model per name, in this order; the Dagster
definitions read the names from here to declare their assets without loading the models.
"""

MAMBA2 = "mamba2"
# the baselines at Mamba2's parameter count (ml.sequence_baselines)
SEQUENCE_BASELINE_NAMES = (
    "lstm",
    "gru",
    "transformer",
    "cnn_lstm",
    "mamba1",
    "s4d",
    "attention_lstm",
)
SEQUENCE_MODEL_NAMES = (MAMBA2, *SEQUENCE_BASELINE_NAMES)
# which asset trains each baseline: the recurrent and attention baselines (`sequence_baselines`)
# and the models of the literature our users come from (`literature_baselines`: MambaStock's
# Mamba1, S4D, the tutorials' attention-pooling LSTM), two processes that run side by side
CLASSIC_BASELINE_NAMES = SEQUENCE_BASELINE_NAMES[:4]
LITERATURE_BASELINE_NAMES = SEQUENCE_BASELINE_NAMES[4:]
