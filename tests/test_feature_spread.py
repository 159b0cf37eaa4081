"""feature_spread against hand-computed cases: k orthogonal directions, one direction."""

import numpy as np
import pytest

from detcon.evaluation import spread


def test_k_equal_orthogonal_directions_have_effective_rank_k():
    # Features ±e_i for i < k, each sign equally often: the centred set has k equal singular values.
    k, d = 5, 16
    rows = [sign * np.eye(d)[i] * scale for i in range(k) for sign in (1, -1) for scale in (1, 3)]
    out = spread.feature_spread(np.stack(rows))
    assert out["effective_rank"] == pytest.approx(k, rel=1e-9)
    # Per dimension: k dimensions hold ±1 in 1/k of the rows (mean 0, std sqrt(1/k)), d - k are 0.
    assert out["mean_dimension_std"] == pytest.approx(k * (1 / k) ** 0.5 / d, rel=1e-9)


def test_one_direction_is_collapsed():
    x = np.tile(np.arange(1.0, 9.0), (10, 1)) * np.arange(1, 11)[:, None]  # scaled copies
    out = spread.feature_spread(x)
    assert out["effective_rank"] == 0.0 and out["mean_dimension_std"] == pytest.approx(0, abs=1e-12)


def test_isotropic_features_use_every_dimension():
    x = np.random.default_rng(0).normal(size=(4000, 8))
    out = spread.feature_spread(x)
    assert 7.8 < out["effective_rank"] <= 8.0
    assert out["mean_dimension_std"] == pytest.approx(1 / np.sqrt(8), rel=0.03)
