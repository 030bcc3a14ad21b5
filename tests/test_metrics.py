import numpy as np
import pytest
from sklearn import metrics as skm

from ml.metrics import block_bootstrap_ci, classification_report


@pytest.fixture
def scored():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 500)
    logits = rng.normal(0, 1, (500, 3)) + 1.5 * np.eye(3)[y] * rng.random((500, 1))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_metrics_agree_with_scikit_learn(scored):
    y, p = scored
    rep = classification_report(y, p)
    pred = p.argmax(1)
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert rep["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert rep["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert rep["log_loss"] == pytest.approx(skm.log_loss(y, p, labels=[0, 1, 2]))
    onehot = np.eye(3)[y]
    assert rep["brier"] == pytest.approx(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def test_a_perfect_forecast_scores_perfectly():
    y = np.array([0, 1, 2, 2])
    rep = classification_report(y, np.eye(3)[y])
    assert rep["accuracy"] == 1.0 and rep["macro_f1"] == 1.0 and rep["brier"] == 0.0
    assert rep["log_loss"] < 1e-9


def test_block_bootstrap_interval_covers_the_mean_and_widens_with_dependence():
    rng = np.random.default_rng(1)
    iid = rng.normal(0.3, 1.0, 2000)
    lo, hi = block_bootstrap_ci(iid, block=1)
    assert lo < 0.3 < hi
    walk = np.repeat(rng.normal(0, 1, 40), 50)  # strongly dependent: 40 distinct blocks
    narrow = np.subtract(*block_bootstrap_ci(walk, block=1)[::-1])
    wide = np.subtract(*block_bootstrap_ci(walk, block=50)[::-1])
    assert wide > 3 * narrow


def test_shape_errors_are_explicit():
    with pytest.raises(ValueError, match="probabilities must be"):
        classification_report(np.array([0, 1]), np.ones((3, 3)) / 3)
