"""BYOL, SimCLR, DetCon-S, MoCo, DenseCL and DetCo losses against hand computation and
explicit-loop float64 NumPy references written from the official formulations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detcon.ops import losses

_byol = jax.jit(losses.byol_loss)
_simclr = jax.jit(losses.simclr_loss, static_argnames=("temperature", "axis_name"))
_detcon_s = jax.jit(losses.detcon_s_loss, static_argnames=("temperature", "axis_name"))
_moco = jax.jit(losses.moco_loss, static_argnames=("temperature",))
_densecl = jax.jit(losses.densecl_loss, static_argnames=("temperature", "dense_weight"))
_detco = jax.jit(losses.detco_loss, static_argnames=("temperature",))


# ----------------------------------------------------------------------------- references


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / max(np.linalg.norm(v), 1e-6)


def _cross_entropy(logits: list, positives: list) -> float:
    """-mean over positives of log softmax(logits)[positive]."""
    top = max(logits)
    log_sum_exp = top + math.log(sum(math.exp(x - top) for x in logits))
    return sum(log_sum_exp - logits[p] for p in positives) / len(positives)


def _byol_loop(pred1, pred2, target1, target2) -> float:
    total = 0.0
    for b in range(len(pred1)):
        for p, t in ((pred1[b], target2[b]), (pred2[b], target1[b])):
            total += 2.0 - 2.0 * float(_unit(p) @ _unit(t))
    return total / len(pred1)


def _simclr_loop(z1, z2, temperature) -> float:
    """add_contrastive_loss: per row, [logits_ab, logits_aa without self], label = own index."""
    batch = len(z1)
    total = 0.0
    for own, other in ((z1, z2), (z2, z1)):
        for i in range(batch):
            anchor = _unit(own[i])
            logits = [anchor @ _unit(other[j]) / temperature for j in range(batch)]
            logits += [anchor @ _unit(own[j]) / temperature for j in range(batch) if j != i]
            total += _cross_entropy(logits, [i])
    return total / batch


def _detcon_s_loop(proj1, proj2, ids1, ids2, temperature) -> float:
    """Eq. 3 with projections on both sides: one roi at a time, candidates listed explicitly."""
    batch, num_rois = np.shape(ids1)
    total = 0.0
    for own, own_ids, other, other_ids in ((proj1, ids1, proj2, ids2), (proj2, ids2, proj1, ids1)):
        for b in range(batch):
            for r in range(num_rois):
                my_id = own_ids[b][r]
                if my_id < 0:
                    continue
                anchor = _unit(own[b][r])
                logits, positives = [], []
                for b2 in range(batch):
                    for r2 in range(num_rois):
                        if other_ids[b2][r2] < 0:
                            continue
                        if b2 == b and other_ids[b2][r2] == my_id:
                            positives.append(len(logits))
                        logits.append(anchor @ _unit(other[b2][r2]) / temperature)
                for b2 in range(batch):
                    for r2 in range(num_rois):
                        if own_ids[b2][r2] < 0 or (b2 == b and own_ids[b2][r2] == my_id):
                            continue
                        logits.append(anchor @ _unit(own[b2][r2]) / temperature)
                if not positives:
                    continue
                times_sampled = sum(1 for i in own_ids[b] if i == my_id)
                total += _cross_entropy(logits, positives) / times_sampled
    return total / (batch * num_rois)


def _moco_rows(q, k, queue, temperature) -> list:
    """Per-row MoCo CE: logits [q.k, q.queue_0, ..., q.queue_K-1] / T, label 0."""
    rows = []
    for i in range(len(q)):
        anchor = _unit(q[i])
        logits = [anchor @ _unit(k[i]) / temperature]
        logits += [anchor @ np.asarray(n, np.float64) / temperature for n in queue]
        rows.append(_cross_entropy(logits, [0]))
    return rows


def _moco_loop(q, k, queue, temperature) -> float:
    rows = _moco_rows(q, k, queue, temperature)
    return sum(rows) / len(rows)


def _densecl_matches_loop(q_backbone, k_backbone) -> np.ndarray:
    batch, cells, _ = np.shape(q_backbone)
    matches = np.zeros((batch, cells), np.int64)
    for b in range(batch):
        for s in range(cells):
            sims = [_unit(q_backbone[b][s]) @ _unit(k_backbone[b][t]) for t in range(cells)]
            matches[b, s] = int(np.argmax(sims))
    return matches


def _densecl_loop(
    q, k, queue, q_dense, k_dense, q_backbone, k_backbone, dense_queue, temperature, dense_weight
) -> float:
    """DenseCL.forward_train: (1 - lambda) * single + lambda * CE mean over all B*S cells."""
    matches = _densecl_matches_loop(q_backbone, k_backbone)
    dense_rows = []
    for b in range(len(q_dense)):
        matched = [k_dense[b][matches[b, s]] for s in range(len(q_dense[b]))]
        dense_rows += _moco_rows(q_dense[b], matched, dense_queue, temperature)
    dense = sum(dense_rows) / len(dense_rows)
    return (1 - dense_weight) * _moco_loop(q, k, queue, temperature) + dense_weight * dense


def _detco_loop(
    q_global, q_local, k_global, k_local, global_queues, local_queues, stage_weights, temperature
) -> float:
    """DetCo's Eq. 1: per stage gg + lg + ll (summed, not averaged), weighted sum over stages."""
    total = 0.0
    for s, weight in enumerate(stage_weights):
        gg = _moco_loop(q_global[s], k_global[s], global_queues[s], temperature)
        lg = _moco_loop(q_local[s], k_global[s], global_queues[s], temperature)
        ll = _moco_loop(q_local[s], k_local[s], local_queues[s], temperature)
        total += weight * (gg + lg + ll)
    return total


def _unit_rows(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------- BYOL


def test_byol_loss_hand_values():
    e0, e1 = np.array([2.0, 0.0], np.float32), np.array([0.0, 0.5], np.float32)
    # Same direction at different scales: 0.
    assert float(_byol(e0[None], e1[None], 3 * e1[None], 5 * e0[None])) == pytest.approx(0.0)
    # pred1 opposite its target (4), pred2 along its target (0).
    assert float(_byol(e0[None], e1[None], e1[None], -e0[None])) == pytest.approx(4.0)
    # Both opposite: 4 + 4; both orthogonal: 2 + 2.
    assert float(_byol(e0[None], e1[None], -e1[None], -e0[None])) == pytest.approx(8.0)
    assert float(_byol(e0[None], e1[None], e0[None], e1[None])) == pytest.approx(4.0)


def test_byol_loss_matches_loop_reference():
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(5, 7)).astype(np.float32) for _ in range(4)]
    np.testing.assert_allclose(float(_byol(*inputs)), _byol_loop(*inputs), rtol=1e-5)


def test_byol_loss_is_float32_for_bfloat16_inputs():
    rng = np.random.default_rng(1)
    inputs = [jnp.asarray(rng.normal(size=(4, 8)), jnp.bfloat16) for _ in range(4)]
    got = _byol(*inputs)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        float(got), _byol_loop(*[np.asarray(x, np.float32) for x in inputs]), rtol=1e-5
    )


# ----------------------------------------------------------------------------- SimCLR


def test_simclr_loss_hand_value_orthogonal_pairs():
    # Two images whose views agree exactly and are orthogonal to each other, T = 1: each row
    # sees its positive at cos 1 and two negatives (other image, both views) at cos 0.
    z = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    expected = 2 * (math.log(math.e + 2) - 1)
    assert float(_simclr(z, z, temperature=1.0)) == pytest.approx(expected, rel=1e-6)


def test_simclr_loss_matches_loop_reference():
    rng = np.random.default_rng(2)
    z1, z2 = (rng.normal(size=(6, 5)).astype(np.float32) for _ in range(2))
    for temperature in (0.1, 0.5):
        np.testing.assert_allclose(
            float(_simclr(z1, z2, temperature=temperature)),
            _simclr_loop(z1, z2, temperature),
            rtol=1e-5,
        )


def _pmap_value_and_grad(loss_fn, sharded: list, num_devices: int):
    """Per-device (loss, grads wrt the sharded float inputs) with cross-device negatives."""
    return jax.pmap(
        jax.value_and_grad(loss_fn, argnums=(0, 1)),
        axis_name="i",
        devices=jax.devices()[:num_devices],
    )(*sharded)


def test_simclr_loss_pmap_mean_and_gradient_equal_global_batch():
    num_devices, per_device = 4, 2
    rng = np.random.default_rng(3)
    z1, z2 = (rng.normal(size=(num_devices * per_device, 5)).astype(np.float32) for _ in range(2))
    single, single_grads = jax.value_and_grad(
        lambda a, b: losses.simclr_loss(a, b, temperature=0.2), argnums=(0, 1)
    )(z1, z2)
    sharded = [x.reshape(num_devices, per_device, -1) for x in (z1, z2)]
    per_device, grads = _pmap_value_and_grad(
        lambda a, b: losses.simclr_loss(a, b, temperature=0.2, axis_name="i"), sharded, num_devices
    )
    np.testing.assert_allclose(float(np.mean(per_device)), float(single), rtol=1e-5)
    # Each device differentiates its own loss; all_gather's transpose sums the other devices'
    # cotangents back, so per-device grads are num_devices x the global-mean gradient.
    for got, want in zip(grads, single_grads):
        np.testing.assert_allclose(
            np.asarray(got).reshape(want.shape) / num_devices,
            np.asarray(want),
            rtol=1e-4,
            atol=1e-6,
        )
    local_only = np.mean(
        [float(_simclr(sharded[0][d], sharded[1][d], temperature=0.2)) for d in range(num_devices)]
    )
    assert abs(local_only - float(single)) > 1e-2


# ----------------------------------------------------------------------------- DetCon-S


def _detcon_s_inputs(seed: int, batch: int, num_rois: int, dim: int, num_ids: int):
    rng = np.random.default_rng(seed)
    proj1, proj2 = (rng.normal(size=(batch, num_rois, dim)).astype(np.float32) for _ in range(2))
    ids1 = rng.integers(0, num_ids, size=(batch, num_rois)).astype(np.int32)
    ids2 = rng.integers(0, num_ids, size=(batch, num_rois)).astype(np.int32)
    ids1[0, 0] = -1  # a padding roi
    return proj1, proj2, ids1, ids2


def test_detcon_s_loss_matches_loop_reference():
    inputs = _detcon_s_inputs(4, batch=3, num_rois=4, dim=5, num_ids=3)
    np.testing.assert_allclose(
        float(_detcon_s(*inputs, temperature=0.1)),
        _detcon_s_loop(*inputs, temperature=0.1),
        rtol=1e-5,
    )


def test_detcon_s_with_one_roi_per_image_is_simclr():
    rng = np.random.default_rng(5)
    z1, z2 = (rng.normal(size=(5, 6)).astype(np.float32) for _ in range(2))
    ids = np.full((5, 1), 7, np.int32)
    np.testing.assert_allclose(
        float(_detcon_s(z1[:, None], z2[:, None], ids, ids)), _simclr_loop(z1, z2, 0.1), rtol=1e-5
    )


def test_detcon_s_gradient_matches_finite_differences_through_both_sides():
    proj1, proj2, ids1, ids2 = _detcon_s_inputs(6, batch=2, num_rois=2, dim=3, num_ids=2)
    grads = jax.grad(losses.detcon_s_loss, argnums=(0, 1))(
        proj1, proj2, ids1, ids2, temperature=0.5
    )
    step = 1e-5
    for arg, grad in zip((0, 1), grads):
        numeric = np.zeros(proj1.shape)
        for index in np.ndindex(proj1.shape):
            plus = [np.asarray(proj1, np.float64), np.asarray(proj2, np.float64)]
            minus = [plus[0].copy(), plus[1].copy()]
            plus[arg][index] += step
            minus[arg][index] -= step
            numeric[index] = (
                _detcon_s_loop(*plus, ids1, ids2, 0.5) - _detcon_s_loop(*minus, ids1, ids2, 0.5)
            ) / (2 * step)
        np.testing.assert_allclose(np.asarray(grad), numeric, rtol=2e-3, atol=2e-5)
    # Stopping the target side (DetCon-B style) changes the gradient: the targets carry it too.
    stopped = jax.grad(
        lambda a, b: losses.detcon_b_loss(
            a,
            b,
            jax.lax.stop_gradient(a),
            jax.lax.stop_gradient(b),
            ids1,
            ids2,
            ids1,
            ids2,
            temperature=0.5,
        )
    )(proj1, proj2)
    assert np.abs(np.asarray(stopped) - np.asarray(grads[0])).max() > 1e-3


def test_detcon_s_loss_pmap_mean_and_gradient_equal_global_batch():
    num_devices, per_device = 4, 2
    proj1, proj2, ids1, ids2 = _detcon_s_inputs(
        7, batch=num_devices * per_device, num_rois=3, dim=4, num_ids=3
    )
    single, single_grads = jax.value_and_grad(losses.detcon_s_loss, argnums=(0, 1))(
        proj1, proj2, ids1, ids2
    )
    sharded = [
        x.reshape((num_devices, per_device) + x.shape[1:]) for x in (proj1, proj2, ids1, ids2)
    ]
    per_device, grads = _pmap_value_and_grad(
        lambda a, b, i1, i2: losses.detcon_s_loss(a, b, i1, i2, axis_name="i"), sharded, num_devices
    )
    np.testing.assert_allclose(float(np.mean(per_device)), float(single), rtol=1e-5)
    for got, want in zip(grads, single_grads):
        np.testing.assert_allclose(
            np.asarray(got).reshape(want.shape) / num_devices,
            np.asarray(want),
            rtol=1e-4,
            atol=1e-6,
        )


# ----------------------------------------------------------------------------- MoCo


def test_moco_loss_hand_values_with_one_negative():
    q = np.array([[3.0, 0.0]], np.float32)
    k = np.array([[0.5, 0.0]], np.float32)
    orthogonal = np.array([[0.0, 1.0]], np.float32)
    # Positive at cos 1, one negative at cos 0, T = 1: log(1 + e^-1).
    assert float(_moco(q, k, orthogonal, temperature=1.0)) == pytest.approx(
        math.log(1 + math.exp(-1)), rel=1e-6
    )
    # The negative equal to the key: a coin flip, log 2, whatever the temperature.
    same = np.array([[1.0, 0.0]], np.float32)
    assert float(_moco(q, k, same, temperature=0.2)) == pytest.approx(math.log(2), rel=1e-6)


def test_moco_loss_matches_loop_reference():
    rng = np.random.default_rng(8)
    q, k = (rng.normal(size=(6, 8)).astype(np.float32) for _ in range(2))
    queue = _unit_rows(rng, (16, 8))
    np.testing.assert_allclose(
        float(_moco(q, k, queue, temperature=0.2)), _moco_loop(q, k, queue, 0.2), rtol=1e-5
    )


# ----------------------------------------------------------------------------- DenseCL


def _densecl_inputs(
    seed: int, batch: int = 2, cells: int = 4, dim: int = 6, channels: int = 5, queue_size: int = 8
):
    rng = np.random.default_rng(seed)
    q, k = (rng.normal(size=(batch, dim)).astype(np.float32) for _ in range(2))
    q_dense, k_dense = (rng.normal(size=(batch, cells, dim)).astype(np.float32) for _ in range(2))
    q_backbone, k_backbone = (
        rng.normal(size=(batch, cells, channels)).astype(np.float32) for _ in range(2)
    )
    return (
        q,
        k,
        _unit_rows(rng, (queue_size, dim)),
        q_dense,
        k_dense,
        q_backbone,
        k_backbone,
        _unit_rows(rng, (queue_size, dim)),
    )


def test_densecl_matches_recover_a_known_permutation():
    # Key cells are the query cells permuted and rescaled (cosine is scale-free), so cell s
    # of the query must match the key cell that holds it.
    rng = np.random.default_rng(9)
    q_backbone = rng.normal(size=(2, 5, 16)).astype(np.float32)
    permutations = [rng.permutation(5) for _ in range(2)]
    k_backbone = np.stack([q_backbone[b][permutations[b]] * (1.0 + b) for b in range(2)])
    expected = np.stack([np.argsort(p) for p in permutations])
    np.testing.assert_array_equal(
        np.asarray(losses.densecl_matches(q_backbone, k_backbone)), expected
    )
    np.testing.assert_array_equal(expected, _densecl_matches_loop(q_backbone, k_backbone))


def test_densecl_loss_hand_value_with_known_match():
    # One image, two cells. Backbone: query cell 0 matches key cell 1 and vice versa. Dense
    # projections: query cell s equals the key projection it is matched to, so every dense
    # positive is cos 1; the one dense negative is orthogonal to all. Global pair likewise.
    e0, e1, e2 = np.eye(3, dtype=np.float32)
    q_backbone = np.array([[[1.0, 0.1], [0.1, 1.0]]], np.float32)
    k_backbone = np.array([[[0.1, 1.0], [1.0, 0.1]]], np.float32)
    k_dense = np.array([[e0, e1]])
    q_dense = np.array([[2 * e1, 3 * e0]])  # cell 0 -> key cell 1 (e1), cell 1 -> key 0 (e0)
    q, k = e0[None], e0[None] * 4
    queue = e2[None]
    one_vs_orthogonal = math.log(1 + math.exp(-1 / 0.2))
    got = _densecl(
        q,
        k,
        queue,
        q_dense,
        k_dense,
        q_backbone,
        k_backbone,
        queue,
        temperature=0.2,
        dense_weight=0.5,
    )
    assert float(got) == pytest.approx(one_vs_orthogonal, rel=1e-5)
    # Had the match been the identity, each dense positive would be orthogonal: log 2.
    dense_only = _densecl(
        q,
        k,
        queue,
        q_dense,
        k_dense,
        q_backbone,
        q_backbone,
        queue,
        temperature=0.2,
        dense_weight=1.0,
    )
    assert float(dense_only) == pytest.approx(math.log(2), rel=1e-5)


def test_densecl_loss_matches_loop_reference():
    inputs = _densecl_inputs(10)
    for weight in (0.0, 0.5, 1.0):
        np.testing.assert_allclose(
            float(_densecl(*inputs, temperature=0.2, dense_weight=weight)),
            _densecl_loop(*inputs, temperature=0.2, dense_weight=weight),
            rtol=1e-5,
        )


def test_densecl_loss_without_dense_weight_is_moco():
    q, k, queue, *_ = inputs = _densecl_inputs(11)
    np.testing.assert_allclose(
        float(_densecl(*inputs, temperature=0.2, dense_weight=0.0)),
        float(_moco(q, k, queue, temperature=0.2)),
        rtol=1e-6,
    )


# ----------------------------------------------------------------------------- DetCo


def test_detco_loss_matches_loop_reference():
    rng = np.random.default_rng(12)
    stages, batch, dim, queue_size = 4, 3, 5, 6
    features = [rng.normal(size=(stages, batch, dim)).astype(np.float32) for _ in range(4)]
    queues = [_unit_rows(rng, (stages, queue_size, dim)) for _ in range(2)]
    weights = np.array([0.1, 0.4, 0.7, 1.0], np.float32)
    np.testing.assert_allclose(
        float(_detco(*features, *queues, weights, temperature=0.2)),
        _detco_loop(*features, *queues, weights, 0.2),
        rtol=1e-5,
    )


def test_detco_loss_single_stage_is_sum_of_three_moco_terms():
    rng = np.random.default_rng(13)
    q_global, q_local, k_global, k_local = (
        rng.normal(size=(1, 4, 6)).astype(np.float32) for _ in range(4)
    )
    global_queue, local_queue = (_unit_rows(rng, (1, 5, 6)) for _ in range(2))
    expected = (
        _moco(q_global[0], k_global[0], global_queue[0], temperature=0.2)
        + _moco(q_local[0], k_global[0], global_queue[0], temperature=0.2)
        + _moco(q_local[0], k_local[0], local_queue[0], temperature=0.2)
    )
    got = _detco(
        q_global,
        q_local,
        k_global,
        k_local,
        global_queue,
        local_queue,
        np.ones(1, np.float32),
        temperature=0.2,
    )
    np.testing.assert_allclose(float(got), float(expected), rtol=1e-6)


def test_detco_loss_equals_eq1_on_hand_built_inputs():
    # Every query equals its key and is orthogonal to the K queue rows, so each InfoNCE term is
    # -log(e^{1/T} / (e^{1/T} + K)) = log(1 + K e^{-1/T}); Eq. 1 gives 3 such terms per stage.
    stages, batch, queue_size, temperature = 4, 2, 3, 0.5
    e = np.eye(5, dtype=np.float32)
    query = np.broadcast_to(e[0], (stages, batch, 5))
    queue = np.broadcast_to(e[1 : 1 + queue_size], (stages, queue_size, 5))
    weights = np.array([0.1, 0.4, 0.7, 1.0], np.float32)
    term = math.log(1.0 + queue_size * math.exp(-1.0 / temperature))
    got = _detco(query, query, query, query, queue, queue, weights, temperature=temperature)
    np.testing.assert_allclose(float(got), 3.0 * term * weights.sum(), rtol=1e-6)
