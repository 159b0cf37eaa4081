"""DetCon-B loss against hand computation and an explicit-loop NumPy reference; probe loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from detcon.ops import losses

# Jitted once per shape: far faster on CPU than op-by-op dispatch.
_loss = jax.jit(losses.detcon_b_loss, static_argnames=("temperature", "axis_name"))


def _detcon_loss_loop(pred1, pred2, target1, target2, pind1, pind2, tind1, tind2, temperature):
    """Independent reference: one roi at a time, candidates listed explicitly, float64."""

    def unit(v):
        v = np.asarray(v, np.float64)
        return v / max(np.linalg.norm(v), 1e-6)

    batch, num_rois, _ = np.shape(pred1)
    total = 0.0
    views = [
        (pred1, pind1, target2, tind2, target1, tind1),
        (pred2, pind2, target1, tind1, target2, tind2),
    ]
    for pred, pind, cross_t, cross_ind, same_t, same_ind in views:
        for b in range(batch):
            for r in range(num_rois):
                my_id = pind[b][r]
                if my_id < 0:
                    continue
                p = unit(pred[b][r])
                logits, positive = [], []
                for b2 in range(batch):
                    for r2 in range(num_rois):
                        if cross_ind[b2][r2] < 0:
                            continue
                        logits.append(p @ unit(cross_t[b2][r2]) / temperature)
                        positive.append(b2 == b and cross_ind[b2][r2] == my_id)
                for b2 in range(batch):
                    for r2 in range(num_rois):
                        if same_ind[b2][r2] < 0 or (b2 == b and same_ind[b2][r2] == my_id):
                            continue
                        logits.append(p @ unit(same_t[b2][r2]) / temperature)
                        positive.append(False)
                if not any(positive):
                    continue
                top = max(logits)
                log_sum_exp = top + math.log(sum(math.exp(x - top) for x in logits))
                pos_logits = [x for x, is_pos in zip(logits, positive) if is_pos]
                cross_entropy = sum(log_sum_exp - x for x in pos_logits) / len(pos_logits)
                times_sampled = sum(1 for k in pind[b] if k == my_id)
                total += cross_entropy / times_sampled
    return total / (batch * num_rois)


def _hand_example():
    """B=2, R=2, D=2 axis-aligned vectors (scaled, to exercise normalisation) and ids."""
    e0, e1 = [3.0, 0.0], [0.0, 0.5]
    pred1 = [[e0, e1], [e1, e0]]
    pred2 = [[e0, e1], [e1, e0]]
    target1 = [[e0, e0], [e1, e0]]
    target2 = [[e0, e1], [e1, e1]]
    # View 1: image 0 samples id 5 twice; image 1's id 2 is absent from view 2 (no positive).
    ids1 = [[5, 5], [1, 2]]
    # View 2: id 7 and id 3 are absent from view 1 (no positive).
    ids2 = [[5, 7], [1, 3]]
    arrays = [np.asarray(x, np.float32) for x in (pred1, pred2, target1, target2)]
    ids = [np.asarray(x, np.int32) for x in (ids1, ids2, ids1, ids2)]
    return arrays + ids


def test_detcon_b_loss_hand_computed_example():
    inputs = _hand_example()
    e = math.e
    # With temperature 1 every logit is 0 or 1; per roi: log-sum-exp over the kept candidates
    # minus the mean positive logit, divided by how often its id was sampled.
    view1 = (
        (math.log(2 * e + 4) - 1) / 2  # image 0, roi 0: id 5 sampled twice
        + math.log(4 * e + 2) / 2  # image 0, roi 1: its positive has logit 0
        + (math.log(3 * e + 4) - 1)
    )  # image 1, roi 0; roi 1 has no positive
    view2 = 2 * (math.log(3 * e + 4) - 1)  # image 0 roi 0 (two positives), image 1 roi 0
    expected = (view1 + view2) / 4
    got = float(_loss(*inputs, temperature=1.0))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(_detcon_loss_loop(*inputs, temperature=1.0), expected, rtol=1e-12)


def _random_inputs(
    seed: int, batch: int, num_rois: int, dim: int, num_ids: int, with_padding: bool = False
):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=(batch, num_rois, dim)).astype(np.float32) for _ in range(4)]
    ids1 = rng.integers(0, num_ids, size=(batch, num_rois)).astype(np.int32)
    ids2 = rng.integers(0, num_ids, size=(batch, num_rois)).astype(np.int32)
    if with_padding:
        ids1[0, :] = -1  # an image with no object in view 1
        ids2[1, 0] = -1
    return arrays + [ids1, ids2, ids1, ids2]


def test_detcon_b_loss_matches_loop_reference_on_random_inputs():
    inputs = _random_inputs(0, batch=3, num_rois=5, dim=4, num_ids=4, with_padding=True)
    got = float(_loss(*inputs, temperature=0.1))
    expected = _detcon_loss_loop(*inputs, temperature=0.1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_detcon_b_loss_distinct_target_ids_differ_from_prediction_ids():
    inputs = _random_inputs(1, batch=2, num_rois=3, dim=3, num_ids=3)
    pred1, pred2, target1, target2, pind1, pind2, _, _ = inputs
    rng = np.random.default_rng(5)
    tind1 = rng.integers(0, 3, size=pind1.shape).astype(np.int32)
    tind2 = rng.integers(0, 3, size=pind2.shape).astype(np.int32)
    args = (pred1, pred2, target1, target2, pind1, pind2, tind1, tind2)
    np.testing.assert_allclose(
        float(_loss(*args, temperature=0.2)), _detcon_loss_loop(*args, temperature=0.2), rtol=1e-5
    )


def test_detcon_b_loss_gradient_is_finite_and_nonzero():
    inputs = _random_inputs(2, batch=2, num_rois=4, dim=3, num_ids=3, with_padding=True)
    inputs[0][1, 1] = 0.0  # a zero prediction must not produce NaN through the normalisation
    grads = jax.jit(jax.grad(losses.detcon_b_loss, argnums=(0, 1, 2, 3)))(*inputs)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
    assert np.abs(np.asarray(grads[0])).sum() > 0


def test_detcon_b_loss_lower_for_aligned_predictions():
    rng = np.random.default_rng(3)
    batch, num_rois, dim = 4, 3, 16
    target1 = rng.normal(size=(batch, num_rois, dim)).astype(np.float32)
    target2 = target1 + 0.1 * rng.normal(size=target1.shape).astype(np.float32)
    ids = np.tile(np.arange(num_rois, dtype=np.int32), (batch, 1))
    aligned = _loss(target2, target1, target1, target2, ids, ids, ids, ids)
    # Predictions of another image: every positive now points at the wrong vector.
    shuffled = _loss(
        np.roll(target2, 1, axis=0),
        np.roll(target1, 1, axis=0),
        target1,
        target2,
        ids,
        ids,
        ids,
        ids,
    )
    assert float(aligned) + 1.0 < float(shuffled)


def test_detcon_b_loss_pmap_mean_equals_global_batch_loss():
    num_devices, per_device = 4, 2
    inputs = _random_inputs(
        4, batch=num_devices * per_device, num_rois=3, dim=5, num_ids=3, with_padding=True
    )
    single = float(_loss(*inputs, temperature=0.1))
    sharded = [x.reshape((num_devices, per_device) + x.shape[1:]) for x in inputs]
    per_device_loss = jax.pmap(
        lambda *xs: losses.detcon_b_loss(*xs, temperature=0.1, axis_name="i"),
        axis_name="i",
        devices=jax.devices()[:num_devices],
    )(*sharded)
    assert per_device_loss.shape == (num_devices,)
    np.testing.assert_allclose(float(np.mean(per_device_loss)), single, rtol=1e-5, atol=1e-5)
    # Without cross-device negatives the per-device losses would differ from the global one.
    local_only = np.mean(
        [float(_loss(*[x[d] for x in sharded], temperature=0.1)) for d in range(num_devices)]
    )
    assert abs(local_only - single) > 1e-3


def test_classification_loss_numbers():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    labels = jnp.array([0, -1, 2])
    loss, top1 = jax.jit(losses.classification_loss)(logits, labels)
    nll_0 = math.log(math.exp(2) + math.exp(1) + 1) - 2
    nll_2 = math.log(math.e + math.exp(3) + 1) - 0
    np.testing.assert_allclose(float(loss), (nll_0 + nll_2) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(top1), 0.5)


def test_classification_loss_without_labels_is_zero_and_nan_free():
    logits = jnp.array([[1.0, -1.0], [0.5, 0.2]])
    labels = jnp.array([-1, -1])
    loss, top1 = jax.jit(losses.classification_loss)(logits, labels)
    assert float(loss) == 0.0 and float(top1) == 0.0
    grad = jax.jit(jax.grad(lambda x: losses.classification_loss(x, labels)[0]))(logits)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
