import numpy as np
import polars as pl

from ml.dataset import Standardizer


def test_standardizer_uses_training_rows_only():
    train = pl.DataFrame({"a": [1.0, 2.0, 3.0], "b": [5.0, 5.0, 5.0]})
    test = pl.DataFrame({"a": [1000.0], "b": [7.0]})
    sc = Standardizer.fit(train, ["a", "b"])
    assert sc.mean == [2.0, 5.0]
    assert sc.std == [1.0, 1.0]  # constant column falls back to 1 instead of dividing by zero
    np.testing.assert_allclose(sc.transform(test), [[998.0, 2.0]])
    assert Standardizer.from_json(sc.to_json()) == sc
