"""Weighted kNN against a brute-force NumPy implementation of DINO's eval_knn."""

import numpy as np
import pytest

from detcon.evaluation import knn


def numpy_knn_scores(train_x, train_y, query_x, num_classes, k, temperature):
    """Brute force: every query against every bank row, one at a time."""
    bank = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    scores = np.zeros((len(query_x), num_classes))
    for i, q in enumerate(query_x):
        sims = bank @ (q / np.linalg.norm(q))
        for j in np.argsort(-sims)[:k]:
            scores[i, train_y[j]] += np.exp(sims[j] / temperature)
    return scores


@pytest.mark.parametrize("k,chunk_size", [(20, 1024), (5, 7), (60, 16)])
def test_knn_matches_brute_force(k, chunk_size):
    rng = np.random.default_rng(0)
    train_x = rng.normal(size=(50, 12)).astype(np.float32)
    train_y = rng.integers(0, 4, size=50)
    query_x = rng.normal(size=(23, 12)).astype(np.float32)
    got = knn.knn_scores(train_x, train_y, query_x, 4, k=k, temperature=0.07, chunk_size=chunk_size)
    want = numpy_knn_scores(train_x, train_y, query_x, 4, min(k, 50), 0.07)
    np.testing.assert_allclose(got, want, rtol=2e-4)
    assert np.array_equal(got.argmax(1), want.argmax(1))


def test_knn_hand_computed_vote():
    # Query along x: neighbours at cosine 1 (class 0), 0.6 (class 1), 0.6 (class 1), -1 (class 0).
    train_x = np.array([[2.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]], np.float32)
    train_y = np.array([0, 1, 1, 0])
    scores = knn.knn_scores(
        train_x, train_y, np.array([[1.0, 0.0]], np.float32), 2, k=3, temperature=0.5
    )
    np.testing.assert_allclose(scores[0], [np.exp(2.0), 2 * np.exp(1.2)], rtol=1e-5)
    # With T = 0.5 the single close neighbour (e^2 = 7.39) outvotes two at 0.6 (2 e^1.2 = 6.64).
    assert knn.top_k_accuracy(scores, np.array([0])) == 1.0


def test_top_k_accuracy():
    scores = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    assert knn.top_k_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert knn.top_k_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert knn.top_k_accuracy(scores, labels, 3) == 1.0


def test_empty_bank_is_refused():
    with pytest.raises(ValueError, match="non-empty"):
        knn.knn_scores(np.zeros((0, 3), np.float32), np.zeros(0, int), np.ones((2, 3)), 2)
