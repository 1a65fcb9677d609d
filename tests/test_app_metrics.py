"""`mfa.metrics` against scikit-learn, SciPy and explicit NumPy loops."""

import jax
import numpy as np
import pytest
import scipy.special
import scipy.stats
import sklearn.metrics

from matfree_lstsq.applications import metrics


@pytest.fixture(scope="module")
def predictions():
    rng = np.random.default_rng(0)
    logits = 2.0 * rng.standard_normal((6, 200, 4))  # 6 samples, 200 data, 4 classes
    labels = rng.integers(0, 4, size=200)
    probs = scipy.special.softmax(logits, axis=-1).mean(axis=0)
    return logits, labels, probs


def test_predictive_probs_and_accuracy(predictions):
    logits, labels, probs = predictions
    np.testing.assert_allclose(metrics.predictive_probs(logits), probs, rtol=1e-13)
    expected = np.mean(np.argmax(probs, axis=-1) == labels)
    assert float(metrics.accuracy(probs, labels)) == pytest.approx(expected, rel=1e-15)
    assert 0.2 < expected < 0.5  # not a degenerate case


def test_both_nll_conventions(predictions):
    logits, labels, probs = predictions
    per_sample = scipy.special.softmax(logits, axis=-1)
    classes = np.arange(4)
    predictive = sklearn.metrics.log_loss(labels, probs, labels=classes)
    expected = np.mean(
        [sklearn.metrics.log_loss(labels, p, labels=classes) for p in per_sample]
    )
    got_predictive = float(metrics.predictive_nll(logits, labels))
    got_expected = float(metrics.expected_nll(logits, labels))
    assert got_predictive == pytest.approx(predictive, rel=1e-12)
    assert got_expected == pytest.approx(expected, rel=1e-12)
    assert got_predictive < got_expected  # Jensen; strict for differing samples
    # Log-probabilities give the same numbers as logits (log-softmax is idempotent).
    log_probs = scipy.special.log_softmax(logits, axis=-1)
    assert float(metrics.predictive_nll(log_probs, labels)) == pytest.approx(
        predictive, rel=1e-12
    )
    # With one sample the two conventions agree.
    one = logits[:1]
    assert float(metrics.predictive_nll(one, labels)) == pytest.approx(
        float(metrics.expected_nll(one, labels)), rel=1e-14
    )


def test_brier_score(predictions):
    _, labels, probs = predictions
    onehot = np.eye(4)[labels]
    expected = np.mean(np.sum((probs - onehot) ** 2, axis=-1))
    assert float(metrics.brier_score(probs, labels)) == pytest.approx(
        expected, rel=1e-13
    )
    # Two classes: twice scikit-learn's binary Brier score of the positive class.
    rng = np.random.default_rng(1)
    p1 = rng.uniform(size=50)
    y = rng.integers(0, 2, size=50)
    two = np.stack([1 - p1, p1], axis=-1)
    assert float(metrics.brier_score(two, y)) == pytest.approx(
        2 * sklearn.metrics.brier_score_loss(y, p1), rel=1e-13
    )


def _calibration_loop(probs, labels, num_bins):
    """ECE and MCE with explicit bins (right-closed, as numpy.digitize(right=True))."""
    conf = probs.max(axis=-1)
    correct = probs.argmax(axis=-1) == labels
    edges = np.linspace(0, 1, num_bins + 1)
    ece, mce = 0.0, 0.0
    for b in range(num_bins):
        lo, hi = edges[b], edges[b + 1]
        mask = (conf > lo) & (conf <= hi) if b > 0 else (conf <= hi)
        if mask.any():
            gap = abs(correct[mask].mean() - conf[mask].mean())
            ece += mask.mean() * gap
            mce = max(mce, gap)
    return ece, mce


@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_calibration_errors(predictions, num_bins):
    _, labels, probs = predictions
    ece, mce = _calibration_loop(probs, labels, num_bins)
    got_ece = metrics.expected_calibration_error(probs, labels, num_bins=num_bins)
    got_mce = metrics.maximum_calibration_error(probs, labels, num_bins=num_bins)
    assert float(got_ece) == pytest.approx(ece, rel=1e-12)
    assert float(got_mce) == pytest.approx(mce, rel=1e-12)
    conf, acc, count = metrics.calibration_bins(probs, labels, num_bins=num_bins)
    assert int(np.sum(count)) == 200


def test_calibration_by_hand():
    # Confidences 0.95, 0.95, 0.95 (two correct) and 0.55 (correct), 10 bins:
    # bin (0.9, 1]: |2/3 − 0.95| = 0.2833, weight 3/4; bin (0.5, 0.6]: 0.45, weight 1/4.
    probs = np.array([[0.95, 0.05], [0.05, 0.95], [0.95, 0.05], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1])
    ece = 0.75 * abs(2 / 3 - 0.95) + 0.25 * 0.45
    assert float(metrics.expected_calibration_error(probs, labels, num_bins=10)) == (
        pytest.approx(ece, rel=1e-12)
    )
    assert float(metrics.maximum_calibration_error(probs, labels, num_bins=10)) == (
        pytest.approx(0.45, rel=1e-12)
    )


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(2)
    # Integer scores: many ties, which count one half.
    in_scores = rng.integers(0, 10, size=300).astype(float) + 1
    out_scores = rng.integers(0, 10, size=200).astype(float)
    y = np.concatenate([np.ones(300), np.zeros(200)])
    expected = sklearn.metrics.roc_auc_score(y, np.concatenate([in_scores, out_scores]))
    assert float(metrics.auroc(in_scores, out_scores)) == pytest.approx(
        expected, rel=1e-12
    )
    assert float(metrics.auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0]))) == 1.0
    assert float(metrics.auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0]))) == 0.0


def test_regression_metrics():
    rng = np.random.default_rng(3)
    mean = rng.standard_normal((40, 2))
    var = rng.uniform(0.1, 2.0, size=(40, 2))
    y = rng.standard_normal((40, 2))
    assert float(metrics.rmse(mean, y)) == pytest.approx(
        np.sqrt(np.mean((mean - y) ** 2)), rel=1e-13
    )
    expected = -np.mean(scipy.stats.norm.logpdf(y, loc=mean, scale=np.sqrt(var)))
    assert float(metrics.gaussian_nll(mean, var, y)) == pytest.approx(
        expected, rel=1e-12
    )
    # A scalar variance broadcasts.
    expected = -np.mean(scipy.stats.norm.logpdf(y, loc=mean, scale=0.5))
    assert float(metrics.gaussian_nll(mean, 0.25, y)) == pytest.approx(
        expected, rel=1e-12
    )


def test_metrics_jit():
    probs = np.array([[0.7, 0.3], [0.2, 0.8]])
    labels = np.array([0, 0])
    ece = jax.jit(lambda p, y: metrics.expected_calibration_error(p, y, num_bins=5))
    assert float(ece(probs, labels)) == pytest.approx(
        _calibration_loop(probs, labels, 5)[0], rel=1e-12
    )


def test_bad_input(predictions):
    logits, labels, probs = predictions
    with pytest.raises(ValueError, match="labels"):
        metrics.accuracy(probs, labels.astype(float))
    with pytest.raises(ValueError, match="labels"):
        metrics.brier_score(probs, labels[:10])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        metrics.accuracy(probs[None], labels)
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        metrics.predictive_nll(probs, labels)
    with pytest.raises(ValueError, match="num_bins"):
        metrics.expected_calibration_error(probs, labels, num_bins=0)
    with pytest.raises(ValueError, match="in_scores"):
        metrics.auroc(np.zeros((2, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        metrics.rmse(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="variance"):
        metrics.gaussian_nll(np.zeros(3), np.ones(4), np.zeros(3))
