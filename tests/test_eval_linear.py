"""Linear probe on precomputed features: ~100 % when separable, chance when labels are shuffled."""

import numpy as np
import pytest

from detcon.evaluation import linear


def _blobs(num_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * spread
    labels = np.repeat(np.arange(num_classes), num_per_class)
    return (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def test_separable_features_reach_full_accuracy():
    x, y = _blobs(60, 6, 16, spread=6.0, seed=0)
    order = np.random.default_rng(1).permutation(len(y))
    x, y = x[order], y[order]
    result = linear.linear_probe(x[:240], y[:240], x[240:], y[240:], 6)
    assert result["top1"] >= 0.99
    assert result["top5"] == 1.0
    assert result["l2_weight"] in linear.DEFAULT_L2_WEIGHTS


def test_shuffled_labels_give_chance():
    x, y = _blobs(150, 4, 16, spread=6.0, seed=2)
    rng = np.random.default_rng(3)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    train_y = rng.permutation(y[:400])  # no relation left between features and labels
    result = linear.linear_probe(x[:400], train_y, x[400:], y[400:], 4)
    assert abs(result["top1"] - 0.25) < 0.12
    assert "top5" not in result  # fewer than 5 classes


def test_logistic_regression_matches_closed_form_optimum_gradient():
    """At the L-BFGS solution the regularised objective's gradient vanishes (checked in NumPy)."""
    x, y = _blobs(30, 3, 5, spread=1.0, seed=4)
    (xs,) = linear.standardise(x)
    l2 = 0.01
    params = linear.fit_logistic_regression(xs, y, np.float32(l2), 3)
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    logits = xs @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = (p - np.eye(3)[y]) / len(y)
    np.testing.assert_allclose(xs.T @ residual + l2 * w, 0, atol=1e-4)
    np.testing.assert_allclose(residual.sum(0), 0, atol=1e-4)


def test_too_few_examples_is_refused():
    with pytest.raises(ValueError, match="two labelled"):
        linear.linear_probe(
            np.zeros((1, 3)), np.zeros(1, int), np.zeros((1, 3)), np.zeros(1, int), 2
        )


def test_zero_weight_examples_do_not_count():
    """Fitting with 0/1 weights equals fitting on the weighted subset alone."""
    x, y = _blobs(20, 3, 4, spread=1.0, seed=5)
    (xs,) = linear.standardise(x)
    weights = (np.arange(len(y)) % 3 != 0).astype(np.float32)
    weighted = linear.fit_logistic_regression(xs, y, np.float32(0.1), 3, weights)
    subset = linear.fit_logistic_regression(xs[weights > 0], y[weights > 0], np.float32(0.1), 3)
    np.testing.assert_allclose(weighted["w"], subset["w"], atol=1e-3)
