"""DETReg's math: box ops and GIoU by hand, the matcher against scipy, the criterion against an
independent float64 NumPy transcription of DETReg's SetCriterion, the sine encoding with padding,
the region crops, and the frozen-torso AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

from detcon.models import detr
from detcon.ops import boxes, losses, matching
from detcon.train import optim


def test_box_conversions_by_hand_and_round_trip():
    cxcywh = np.array([[0.5, 0.5, 0.2, 0.4], [0.3, 0.7, 0.6, 0.2]], np.float32)
    xyxy = np.array([[0.4, 0.3, 0.6, 0.7], [0.0, 0.6, 0.6, 0.8]], np.float32)
    np.testing.assert_allclose(boxes.cxcywh_to_xyxy(cxcywh), xyxy, atol=1e-7)
    np.testing.assert_allclose(boxes.xyxy_to_cxcywh(xyxy), cxcywh, atol=1e-7)
    np.testing.assert_allclose(boxes.box_area(xyxy), [0.08, 0.12], rtol=1e-6)


def test_generalized_box_iou_by_hand():
    a = jnp.array([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = jnp.array([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    got = np.asarray(boxes.generalized_box_iou(a, b))
    assert got.shape == (2, 3)
    # Overlap 1, union 7, hull 9: 1/7 - 2/9. Disjoint: iou 0, union 5 (4 + 1), hull 6 -> -1/6.
    np.testing.assert_allclose(got[0, 0], 1 / 7 - 2 / 9, rtol=1e-6)
    np.testing.assert_allclose(got[0, 1], 0.0 - (6 - 5) / 6, rtol=1e-6)
    np.testing.assert_allclose(got[0, 2], 1.0, rtol=1e-6)  # identical
    # a[1] inside b[2]: iou 1/4, hull = union -> 1/4; a[1] vs b[1]: gap 1, hull 3, union 2.
    np.testing.assert_allclose(got[1, 2], 0.25, rtol=1e-6)
    np.testing.assert_allclose(got[1, 1], -1 / 3, rtol=1e-6)


def test_crop_and_resize_identity_and_flat_region():
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.uniform(size=(8, 8, 3)), jnp.float32)
    whole = boxes.crop_and_resize(image, jnp.array([[0.0, 0.0, 8.0, 8.0]]), 8)
    np.testing.assert_allclose(whole[0], image, atol=1e-6)
    # A 2x down-sampling samples between pixel pairs: the mean of each 2 x 2 block.
    half = boxes.crop_and_resize(image, jnp.array([[0.0, 0.0, 8.0, 8.0]]), 4)[0]
    blocks = np.asarray(image).reshape(4, 2, 4, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(half, blocks, atol=1e-6)
    # The top-right quarter (x 4..8, y 0..4) at its own resolution: the pixels themselves.
    quarter = boxes.crop_and_resize(image, jnp.array([[4.0, 0.0, 8.0, 4.0]]), 4)[0]
    np.testing.assert_allclose(quarter, np.asarray(image)[:4, 4:], atol=1e-6)


def test_matcher_equals_scipy_with_padding_and_under_jit():
    rng = np.random.default_rng(1)
    cost = rng.normal(size=(3, 10, 6)).astype(np.float32)
    valid = np.array([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
    got = np.asarray(jax.jit(matching.hungarian_match)(jnp.asarray(cost), jnp.asarray(valid)))
    assert got.dtype == np.int32 and got.shape == (3, 6)
    assert np.all(got[~valid] == -1)
    for b in range(3):
        cols = np.flatnonzero(valid[b])
        if cols.size == 0:
            continue
        rows, order = scipy.optimize.linear_sum_assignment(cost[b][:, cols])
        best = cost[b][rows, cols[order]].sum()
        ours = cost[b][got[b, cols], cols].sum()
        np.testing.assert_allclose(ours, best, rtol=1e-6)
        assert len(set(got[b, cols])) == cols.size  # a query serves one target at most
        np.testing.assert_array_equal(got[b, cols[order]], rows)  # unique optimum: same pairs


def test_matcher_under_pmap_and_grad_of_the_cost_is_zero():
    rng = np.random.default_rng(2)
    cost = jnp.asarray(rng.normal(size=(2, 1, 5, 3)), jnp.float32)
    valid = jnp.ones((2, 1, 3), bool)
    got = jax.pmap(matching.hungarian_match, devices=jax.devices()[:2])(cost, valid)
    for d in range(2):
        rows, cols = scipy.optimize.linear_sum_assignment(np.asarray(cost[d, 0]))
        np.testing.assert_array_equal(np.asarray(got[d, 0])[cols], rows)
    grad = jax.grad(lambda c: jnp.sum(matching.hungarian_match(c, valid[0]).astype(jnp.float32)))
    np.testing.assert_array_equal(grad(cost[0]), 0.0)


def test_sine_encoding_by_hand_and_invariant_to_padding():
    mask = np.zeros((1, 3, 4), bool)
    mask[0, :2, :3] = True  # a 2 x 3 image at the top-left of a 3 x 4 canvas
    feats = 4
    pos = np.asarray(detr.sine_position_encoding(jnp.asarray(mask), num_pos_feats=feats))
    assert pos.shape == (1, 3, 4, 2 * feats)
    eps, two_pi = 1e-6, 2 * math.pi
    # Position (row 1, col 2): y = (2 - 0.5) / 2 * 2 pi, x = (3 - 0.5) / 3 * 2 pi.
    y, x = (2 - 0.5) / (2 + eps) * two_pi, (3 - 0.5) / (3 + eps) * two_pi
    dim_t = 10000.0 ** (2 * (np.arange(feats) // 2) / feats)
    expect_y = [
        np.sin(y / dim_t[0]),
        np.cos(y / dim_t[1]),
        np.sin(y / dim_t[2]),
        np.cos(y / dim_t[3]),
    ]
    expect_x = [
        np.sin(x / dim_t[0]),
        np.cos(x / dim_t[1]),
        np.sin(x / dim_t[2]),
        np.cos(x / dim_t[3]),
    ]
    np.testing.assert_allclose(pos[0, 1, 2], expect_y + expect_x, rtol=1e-5, atol=1e-6)
    # The image's own encoding does not depend on the padding around it.
    alone = detr.sine_position_encoding(jnp.ones((1, 2, 3), bool), num_pos_feats=feats)
    np.testing.assert_allclose(pos[0, :2, :3], np.asarray(alone)[0], rtol=1e-5, atol=1e-6)


def test_feature_mask_samples_like_nearest_interpolation():
    pad = np.zeros((1, 64, 64), bool)
    pad[0, :40, :64] = True  # 40 image rows
    got = np.asarray(detr.feature_mask(jnp.asarray(pad), 2, 2))
    # F.interpolate(nearest) to 2 x 2 reads pixels 0 and 32: row 32 < 40 is image.
    np.testing.assert_array_equal(got[0], [[True, True], [True, True]])
    got = np.asarray(detr.feature_mask(jnp.asarray(pad), 4, 4))  # rows 0, 16, 32, 48
    np.testing.assert_array_equal(got[0, :, 0], [True, True, True, False])


# ----------------------------------------------------------------- the criterion, in float64


def _np_giou(a: np.ndarray, b: np.ndarray) -> float:
    """GIoU of two cxcywh boxes, written out."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _np_criterion(logits, pred, embed, tboxes, tvalid, tembed, num_boxes, tclasses=None):
    """DETReg's DETR SetCriterion (models/detr.py + detr_matcher.py), one device, float64 loops:
    returns (total, [(ce, bbox, giou) per layer], embedding loss). Every target is class 1
    (DETReg) unless tclasses [B, T] gives each its own (DETR)."""
    if tclasses is None:
        tclasses = np.ones(tvalid.shape, np.int64)
    logits, pred, embed = (np.asarray(x, np.float64) for x in (logits, pred, embed))
    tboxes, tembed = np.asarray(tboxes, np.float64), np.asarray(tembed, np.float64)
    num_layers, batch, num_queries, num_logits = logits.shape
    per_layer, last_indices = [], None
    for layer in range(num_layers):
        indices = []
        for b in range(batch):
            targets = [t for t in range(tboxes.shape[1]) if tvalid[b, t]]
            prob = np.exp(logits[layer, b] - logits[layer, b].max(-1, keepdims=True))
            prob /= prob.sum(-1, keepdims=True)
            cost = np.zeros((num_queries, len(targets)))
            for q in range(num_queries):
                for j, t in enumerate(targets):
                    l1 = np.abs(pred[layer, b, q] - tboxes[b, t]).sum()
                    cost[q, j] = (
                        5 * l1
                        - 1 * prob[q, tclasses[b, t]]
                        - 2 * _np_giou(pred[layer, b, q], tboxes[b, t])
                    )
            rows, cols = scipy.optimize.linear_sum_assignment(cost)
            indices.append([(q, targets[j]) for q, j in zip(rows, cols)])
        ce_num = ce_den = bbox = giou = 0.0
        for b in range(batch):
            matched = {q: t for q, t in indices[b]}
            for q in range(num_queries):
                cls = tclasses[b, matched[q]] if q in matched else num_logits - 1
                w = 1.0 if q in matched else 0.1
                lse = np.log(np.exp(logits[layer, b, q] - logits[layer, b, q].max()).sum())
                ce_num += w * -(logits[layer, b, q, cls] - logits[layer, b, q].max() - lse)
                ce_den += w
            for q, t in indices[b]:
                bbox += np.abs(pred[layer, b, q] - tboxes[b, t]).sum()
                giou += 1 - _np_giou(pred[layer, b, q], tboxes[b, t])
        per_layer.append((ce_num / ce_den, bbox / num_boxes, giou / num_boxes))
        last_indices = indices
    diffs = [np.abs(embed[b, q] - tembed[b, t]) for b in range(batch) for q, t in last_indices[b]]
    emb = np.mean(np.concatenate(diffs))  # F.l1_loss(reduction='mean') over the matched pairs
    total = sum(ce + 5 * l1 + 2 * g for ce, l1, g in per_layer) + emb
    return total, per_layer, emb


def _random_case(seed: int, batch: int = 2, valid_counts=(2, 3)):
    rng = np.random.default_rng(seed)
    layers, queries, targets, classes, dim = 3, 6, 4, 4, 5
    logits = rng.normal(size=(layers, batch, queries, classes + 1)).astype(np.float32)
    centre = rng.uniform(0.25, 0.75, size=(layers, batch, queries, 2))
    size = rng.uniform(0.1, 0.4, size=(layers, batch, queries, 2))
    pred = np.concatenate([centre, size], -1).astype(np.float32)
    tboxes = np.concatenate(
        [rng.uniform(0.3, 0.7, (batch, targets, 2)), rng.uniform(0.1, 0.5, (batch, targets, 2))], -1
    ).astype(np.float32)
    tvalid = np.zeros((batch, targets), bool)
    for b, n in enumerate(valid_counts):
        tvalid[b, :n] = True
    tboxes[~tvalid] = 0.0  # padding as the batches carry it
    embed = rng.normal(size=(batch, queries, dim)).astype(np.float32)
    tembed = rng.normal(size=(batch, targets, dim)).astype(np.float32)
    return logits, pred, embed, tboxes, tvalid, tembed


def test_detreg_loss_equals_the_float64_transcription():
    logits, pred, embed, tboxes, tvalid, tembed = _random_case(0)
    total, metrics = jax.jit(losses.detreg_loss)(logits, pred, embed, tboxes, tvalid, tembed)
    ref_total, per_layer, emb = _np_criterion(logits, pred, embed, tboxes, tvalid, tembed, 5.0)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_ce"], per_layer[-1][0], rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_bbox"], per_layer[-1][1], rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_giou"], per_layer[-1][2], rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_object_embedding"], emb, rtol=1e-5)


def test_detr_loss_with_a_class_per_target_equals_the_float64_transcription():
    logits, pred, embed, tboxes, tvalid, tembed = _random_case(1)
    tclasses = np.random.default_rng(1).integers(0, logits.shape[-1] - 1, tvalid.shape)
    assert len(set(tclasses[tvalid].tolist())) > 1  # several classes among the targets
    total, metrics, match = jax.jit(losses.detr_loss)(logits, pred, tboxes, tclasses, tvalid)
    ref_total, per_layer, emb = _np_criterion(
        logits, pred, embed, tboxes, tvalid, tembed, 5.0, tclasses
    )
    np.testing.assert_allclose(total, ref_total - emb, rtol=1e-5)
    for i, name in enumerate(("loss_ce", "loss_bbox", "loss_giou")):
        np.testing.assert_allclose(metrics[name], per_layer[-1][i], rtol=1e-5)
    assert match.shape == tvalid.shape and (np.asarray(match)[~tvalid] == -1).all()
    # All targets of class 1: DETReg's criterion less its embedding term.
    ones = np.ones(tvalid.shape, np.int32)
    detreg_total, _ = losses.detreg_loss(logits, pred, embed, tboxes, tvalid, tembed)
    detr_total, _, _ = losses.detr_loss(logits, pred, tboxes, ones, tvalid)
    _, _, emb = _np_criterion(logits, pred, embed, tboxes, tvalid, tembed, 5.0)
    np.testing.assert_allclose(detr_total, detreg_total - emb, rtol=1e-5)


def test_detreg_loss_perfect_boxes_leave_only_classification():
    # One image, one target predicted exactly by query 0, which also gives class 1 a large logit.
    logits = np.zeros((1, 1, 3, 3), np.float32)
    logits[0, 0, 0, 1] = 20.0
    logits[0, 0, 1:, 2] = 20.0  # the others say "no object"
    pred = np.tile(np.array([0.5, 0.5, 0.2, 0.2], np.float32), (1, 1, 3, 1))
    pred[0, 0, 1:] = [0.2, 0.2, 0.1, 0.1]
    target = np.array([[[0.5, 0.5, 0.2, 0.2]]], np.float32)
    embed = np.ones((1, 3, 2), np.float32)
    total, m = losses.detreg_loss(
        logits, pred, embed, target, np.ones((1, 1), bool), np.ones((1, 1, 2), np.float32)
    )
    assert float(m["loss_bbox"]) < 1e-6 and float(m["loss_giou"]) < 1e-6
    assert float(m["loss_object_embedding"]) == 0.0
    # What is left: the cross-entropy of confident right answers, about e^-20 per query.
    assert 0.0 <= float(total) < 1e-6


def test_box_count_is_averaged_over_devices():
    # Two devices with 2 and 4 valid boxes: the box terms divide by (2 + 4) / 2 = 3 on both.
    case = _random_case(3, batch=1, valid_counts=(2,)), _random_case(4, batch=1, valid_counts=(4,))
    stacked = [np.stack([a, b]) for a, b in zip(*case)]
    fn = jax.pmap(
        lambda *xs: losses.detreg_loss(*xs, axis_name="d"), axis_name="d", devices=jax.devices()[:2]
    )
    _, metrics = fn(*stacked)
    for d in range(2):
        _, per_layer, emb = _np_criterion(*case[d], num_boxes=3.0)
        np.testing.assert_allclose(metrics["loss_bbox"][d], per_layer[-1][1], rtol=1e-5)
        np.testing.assert_allclose(metrics["loss_giou"][d], per_layer[-1][2], rtol=1e-5)
        np.testing.assert_allclose(metrics["loss_object_embedding"][d], emb, rtol=1e-5)


# ----------------------------------------------------------------------- frozen-torso AdamW


def test_adamw_freezes_the_torso_without_state_and_clips_trainable_only():
    params = {
        "res_net10/~/initial_conv": {"w": jnp.ones((3,))},
        "transformer/~/linear": {"w": jnp.full((2,), 2.0), "b": jnp.zeros((2,))},
    }
    grads = {
        "res_net10/~/initial_conv": {"w": jnp.full((3,), 1e6)},  # would dominate a global clip
        "transformer/~/linear": {"w": jnp.array([0.03, 0.04]), "b": jnp.zeros((2,))},
    }
    tx = optim.adamw(1e-2, weight_decay=1e-4, clip_norm=0.1, frozen_prefix="res_net")
    state = tx.init(params)
    sizes = [x.size for x in jax.tree_util.tree_leaves(state)]
    # Adam's mu and nu over the 4 trainable scalars, plus counters: nothing for the 3 frozen.
    assert sum(s for s in sizes if s > 1) == 2 * 4, sizes
    updates, _ = tx.update(grads, state, params)
    np.testing.assert_array_equal(updates["res_net10/~/initial_conv"]["w"], 0.0)
    # Norm 0.05 < 0.1: no clipping, so the update is plain AdamW's on the trainable leaves.
    plain = optax.adamw(1e-2, weight_decay=1e-4)
    trainable = {"transformer/~/linear": params["transformer/~/linear"]}
    expect, _ = plain.update(
        {"transformer/~/linear": grads["transformer/~/linear"]}, plain.init(trainable), trainable
    )
    np.testing.assert_allclose(
        updates["transformer/~/linear"]["w"], expect["transformer/~/linear"]["w"], rtol=1e-6
    )


def test_step_drop_schedule():
    lr = lambda s: float(optim.step_drop_learning_rate(s, base_learning_rate=1e-4, drop_steps=10))
    assert lr(0) == pytest.approx(1e-4) and lr(9) == pytest.approx(1e-4)
    assert lr(10) == pytest.approx(1e-5)
