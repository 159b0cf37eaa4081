"""Objectives as pure `jnp` functions: DetCon-B/S, BYOL, SimCLR, MoCo v2, DenseCL, DetCo, DETReg,
probe."""

from typing import Optional

import jax
import jax.numpy as jnp

from detcon.ops import boxes as box_ops
from detcon.ops import matching

# Subtracted from logits that must leave the softmax; finite (unlike -inf) so that gradients
# and fully masked rows stay NaN-free.
_LARGE_NUM = 1e9


def l2_normalize(x: jax.Array, axis: int = -1, epsilon: float = 1e-12) -> jax.Array:
    """x / max(||x||, sqrt(epsilon)) along `axis`, same shape as x (a zero vector stays zero)."""
    squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, epsilon))


def _view_loss(
    pred: jax.Array,
    pind: jax.Array,
    cross_target: jax.Array,
    cross_tind: jax.Array,
    same_target: jax.Array,
    same_tind: jax.Array,
    same_image: jax.Array,
    temperature: float,
) -> jax.Array:
    """Weighted NCE for one view: pred [B, R, D] vs targets [B', R, D] -> scalar mean over B*R.

    `same_image` [B, B'] marks the candidate image that is each prediction's own image.
    """
    batch, num_rois = pind.shape
    valid_pred = pind >= 0
    # [B, R, B', R]: same image and same object id.
    same_cross = same_image[:, None, :, None] & (pind[:, :, None, None] == cross_tind[None, None])
    same_same = same_image[:, None, :, None] & (pind[:, :, None, None] == same_tind[None, None])

    logits_cross = jnp.einsum("brd,ksd->brks", pred, cross_target) / temperature
    logits_same = jnp.einsum("brd,ksd->brks", pred, same_target) / temperature
    # The same object seen by the same view is neither positive nor negative; targets of
    # padding rois (negative id, see detcon.ops.masks.NO_MASK_ID) are not candidates at all.
    logits_cross = logits_cross - _LARGE_NUM * (cross_tind < 0)[None, None].astype(pred.dtype)
    logits_same = logits_same - _LARGE_NUM * (same_same | (same_tind < 0)[None, None]).astype(
        pred.dtype
    )
    logits = jnp.concatenate(
        [logits_cross.reshape(batch, num_rois, -1), logits_same.reshape(batch, num_rois, -1)],
        axis=-1,
    )

    positives = (same_cross & valid_pred[:, :, None, None]).astype(pred.dtype)
    positives = positives.reshape(batch, num_rois, -1)
    num_positives = jnp.sum(positives, axis=-1)
    labels = positives / jnp.maximum(num_positives, 1.0)[..., None]
    labels = jnp.concatenate([labels, jnp.zeros_like(labels)], axis=-1)
    cross_entropy = -jnp.sum(labels * jax.nn.log_softmax(logits, axis=-1), axis=-1)

    # Each object counts once per image however often it was sampled.
    times_sampled = jnp.sum(pind[:, :, None] == pind[:, None, :], axis=-1).astype(pred.dtype)
    weights = (num_positives > 0).astype(pred.dtype) / times_sampled
    return jnp.sum(weights * cross_entropy) / (batch * num_rois)


def detcon_b_loss(
    pred1: jax.Array,
    pred2: jax.Array,
    target1: jax.Array,
    target2: jax.Array,
    pind1: jax.Array,
    pind2: jax.Array,
    tind1: jax.Array,
    tind2: jax.Array,
    *,
    temperature: float = 0.1,
    axis_name: Optional[str] = None,
) -> jax.Array:
    """DetCon-B contrastive detection loss (Eq. 3), a scalar; preds/targets [B, R, D], ids [B, R].

    Prediction (image b, roi r) of view 1 is scored against every target of both views
    (of every device's images when `axis_name` is given, via all_gather); its positives are
    view-2 targets of image b with the same id, same-view targets of image b with the same id
    are dropped, everything else is a negative. Cross-entropy against the uniform distribution
    over positives, weighted by 1 / (times the id was sampled in that image and view), zero
    without a positive; mean over B*R; plus the symmetric view-2 term. Under pmap the mean of
    per-device losses equals the loss of the whole global batch. Rois with a negative id are
    padding: no loss and not candidates. Callers stop gradients into targets themselves.
    """
    batch = pred1.shape[0]
    # float32 whatever the model's compute dtype: a softmax over 2*B'*R candidates with 1e9
    # offsets is not safe in bfloat16.
    pred1, pred2, target1, target2 = (
        l2_normalize(x.astype(jnp.float32)) for x in (pred1, pred2, target1, target2)
    )

    if axis_name is not None:
        target1, target2, tind1, tind2 = jax.lax.all_gather(
            (target1, target2, tind1, tind2), axis_name, tiled=True
        )
        offset = jax.lax.axis_index(axis_name) * batch
    else:
        offset = 0
    candidate_images = jnp.arange(target1.shape[0])
    same_image = (jnp.arange(batch) + offset)[:, None] == candidate_images[None, :]

    loss_1 = _view_loss(pred1, pind1, target2, tind2, target1, tind1, same_image, temperature)
    loss_2 = _view_loss(pred2, pind2, target1, tind1, target2, tind2, same_image, temperature)
    return loss_1 + loss_2


def detcon_s_loss(
    proj1: jax.Array,
    proj2: jax.Array,
    ids1: jax.Array,
    ids2: jax.Array,
    *,
    temperature: float = 0.1,
    axis_name: Optional[str] = None,
) -> jax.Array:
    """DetCon-S loss, a scalar: DetCon-B's NCE with the projections [B, R, D] (ids [B, R]) as both
    predictions and targets, gradients flowing through every term.

    The released DetCon code ships DetCon-B only; the paper's DetCon-S is this objective on the
    SimCLR side (no predictor, no target network). A roi's own projection in its own view, and
    any resampling of the same id, is masked out of the candidates, as SimCLR masks self-pairs.
    """
    return detcon_b_loss(
        proj1,
        proj2,
        proj1,
        proj2,
        ids1,
        ids2,
        ids1,
        ids2,
        temperature=temperature,
        axis_name=axis_name,
    )


def simclr_loss(
    z1: jax.Array, z2: jax.Array, *, temperature: float = 0.1, axis_name: Optional[str] = None
) -> jax.Array:
    """SimCLR NT-Xent, a scalar: mean over B of CE(view 1 row) + mean of CE(view 2 row); z [B, D].

    Candidates of a row are both views of every image (of every device under `axis_name`)
    except itself; its positive is the other view of its own image. Under pmap the mean of
    per-device losses equals the loss of the whole global batch.
    """
    # One roi per image with a shared id is exactly SimCLR's [logits_ab, logits_aa] layout:
    # the same-view self-pair is masked, the other view of the same image is the positive.
    ids = jnp.zeros((z1.shape[0], 1), jnp.int32)
    return detcon_s_loss(
        z1[:, None], z2[:, None], ids, ids, temperature=temperature, axis_name=axis_name
    )


def byol_loss(
    pred1: jax.Array, pred2: jax.Array, target1: jax.Array, target2: jax.Array
) -> jax.Array:
    """BYOL regression loss, a scalar: mean over B of |p1^ - t2^|^2 + |p2^ - t1^|^2; inputs [B, D].

    With unit vectors (^) each term is 2 - 2 cos. Callers stop gradients into targets.
    """
    pred1, pred2, target1, target2 = (
        l2_normalize(x.astype(jnp.float32)) for x in (pred1, pred2, target1, target2)
    )
    per_image = jnp.sum(jnp.square(pred1 - target2), axis=-1) + jnp.sum(
        jnp.square(pred2 - target1), axis=-1
    )
    return jnp.mean(per_image)


def _queue_info_nce(
    queries: jax.Array, keys: jax.Array, queue: jax.Array, temperature: float
) -> jax.Array:
    """Mean over N of CE(label 0) of [q.k, q.queue] / T; unit queries, keys [N, D], queue [K, D]."""
    positive = jnp.sum(queries * keys, axis=-1, keepdims=True)
    negatives = queries @ queue.T
    logits = jnp.concatenate([positive, negatives], axis=-1) / temperature
    return -jnp.mean(jax.nn.log_softmax(logits, axis=-1)[:, 0])


def moco_loss(q: jax.Array, k: jax.Array, queue: jax.Array, *, temperature: float) -> jax.Array:
    """MoCo InfoNCE, a scalar: q [B, D] against its key k [B, D] and the queue [K, D] of negatives.

    q and k are L2-normalised here; the queue is used as stored (keys enter it normalised).
    Callers stop gradients into k and the queue.
    """
    q, k = (l2_normalize(x.astype(jnp.float32)) for x in (q, k))
    return _queue_info_nce(q, k, queue.astype(jnp.float32), temperature)


def densecl_matches(q_backbone: jax.Array, k_backbone: jax.Array) -> jax.Array:
    """Index [B, S] of the key cell most cosine-similar to each query cell; features [B, S, C]."""
    q_backbone, k_backbone = (l2_normalize(x.astype(jnp.float32)) for x in (q_backbone, k_backbone))
    similarity = jnp.einsum("bsc,btc->bst", q_backbone, k_backbone)
    return jnp.argmax(similarity, axis=-1)


def densecl_loss(
    q: jax.Array,
    k: jax.Array,
    queue: jax.Array,
    q_dense: jax.Array,
    k_dense: jax.Array,
    q_backbone: jax.Array,
    k_backbone: jax.Array,
    dense_queue: jax.Array,
    *,
    temperature: float = 0.2,
    dense_weight: float = 0.5,
) -> jax.Array:
    """DenseCL loss, a scalar: (1 - w) * MoCo(q, k, queue) + w * dense InfoNCE over B*S cells.

    q, k [B, D]; q_dense, k_dense [B, S, D]; q_backbone, k_backbone [B, S, C]; queues [K, D].
    Each query cell's positive is the key-view dense projection at the cell whose backbone
    feature is most cosine-similar; its negatives are dense_queue (pooled dense keys).
    Callers stop gradients into the key side and the queues.
    """
    global_loss = moco_loss(q, k, queue, temperature=temperature)
    matches = densecl_matches(q_backbone, k_backbone)
    q_dense, k_dense = (l2_normalize(x.astype(jnp.float32)) for x in (q_dense, k_dense))
    matched_keys = jnp.take_along_axis(k_dense, matches[..., None], axis=1)
    dim = q_dense.shape[-1]
    dense_loss = _queue_info_nce(
        q_dense.reshape(-1, dim),
        matched_keys.reshape(-1, dim),
        dense_queue.astype(jnp.float32),
        temperature,
    )
    return (1.0 - dense_weight) * global_loss + dense_weight * dense_loss


def detco_loss(
    q_global: jax.Array,
    q_local: jax.Array,
    k_global: jax.Array,
    k_local: jax.Array,
    global_queues: jax.Array,
    local_queues: jax.Array,
    stage_weights: jax.Array,
    *,
    temperature: float = 0.2,
) -> jax.Array:
    """DetCo's Eq. 1, a scalar: sum_s w_s (L_g-g + L_l-g + L_l-l); features [S, B, D].

    Per stage s: global query vs global key (global queue), local query vs global key
    (global queue), local query vs local key (local queue); queues [S, K, D], weights [S].
    A local feature is the 9 patch features of a view jointly projected to one vector. The
    three terms are summed, not averaged: the stage weights 0.1/0.4/0.7/1.0 come with the sum
    (paper Eq. 1; shuuchen/DetCo.pytorch main_detco.py adds the terms).
    """
    q_global, q_local, k_global, k_local = (
        l2_normalize(x.astype(jnp.float32)) for x in (q_global, q_local, k_global, k_local)
    )
    global_queues, local_queues = (x.astype(jnp.float32) for x in (global_queues, local_queues))

    def stage_loss(qg, ql, kg, kl, queue_g, queue_l):
        return (
            _queue_info_nce(qg, kg, queue_g, temperature)
            + _queue_info_nce(ql, kg, queue_g, temperature)
            + _queue_info_nce(ql, kl, queue_l, temperature)
        )

    per_stage = jax.vmap(stage_loss)(
        q_global, q_local, k_global, k_local, global_queues, local_queues
    )
    return jnp.sum(jnp.asarray(stage_weights, jnp.float32) * per_stage)


def classification_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(softmax cross-entropy, top-1 accuracy) over labelled rows of logits [N, K], labels [N].

    Label -1 marks an unlabelled example; both values are 0 when nothing is labelled.
    """
    labelled = labels >= 0
    safe_labels = jnp.where(labelled, labels, 0).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe_labels[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == safe_labels).astype(log_probs.dtype)
    weight = labelled.astype(log_probs.dtype)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    return jnp.sum(nll * weight) / count, jnp.sum(correct * weight) / count


def _per_target(target_class: int | jax.Array, target_boxes: jax.Array) -> jax.Array:
    """The class of every target: an int or [B, T] int array -> [B, T] int32."""
    classes = jnp.asarray(target_class, jnp.int32)
    return jnp.broadcast_to(classes, target_boxes.shape[:2])


def detr_match_cost(
    logits: jax.Array,
    boxes: jax.Array,
    target_boxes: jax.Array,
    *,
    target_class: int | jax.Array,
    cost_class: float,
    cost_bbox: float,
    cost_giou: float,
) -> jax.Array:
    """DETR's matching cost (detr_matcher.py): class -p(target), L1 and -GIoU on cxcywh boxes.

    logits [B, Q, C+1], boxes [B, Q, 4], target_boxes [B, T, 4], target_class one class for
    every target or [B, T] per target -> [B, Q, T].
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    classes = _per_target(target_class, target_boxes)
    index = jnp.broadcast_to(classes[:, None, :], boxes.shape[:2] + classes.shape[1:])
    prob = jnp.take_along_axis(probs, index, axis=-1)  # [B, Q, T]
    l1 = jnp.sum(jnp.abs(boxes[:, :, None, :] - target_boxes[:, None, :, :]), axis=-1)
    giou = jax.vmap(box_ops.generalized_box_iou)(
        box_ops.cxcywh_to_xyxy(boxes), box_ops.cxcywh_to_xyxy(target_boxes)
    )
    return cost_bbox * l1 - cost_class * prob - cost_giou * giou


def _gather_queries(x: jax.Array, match: jax.Array) -> jax.Array:
    """Rows of x [B, Q, D] at the matched queries match [B, T] (-1 read as 0) -> [B, T, D]."""
    return jnp.take_along_axis(x, jnp.maximum(match, 0)[..., None], axis=1)


def _paired_giou(a: jax.Array, b: jax.Array) -> jax.Array:
    """GIoU of corresponding cxcywh boxes: [..., 4], [..., 4] -> [...]."""
    flat_a = box_ops.cxcywh_to_xyxy(a).reshape(-1, 1, 4)
    flat_b = box_ops.cxcywh_to_xyxy(b).reshape(-1, 1, 4)
    giou = jax.vmap(box_ops.generalized_box_iou)(flat_a, flat_b)
    return giou.reshape(a.shape[:-1])


def _detr_layer_losses(
    logits: jax.Array,
    boxes: jax.Array,
    match: jax.Array,
    target_boxes: jax.Array,
    target_classes: jax.Array,
    valid: jax.Array,
    num_boxes: jax.Array,
    *,
    eos_coef: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decoder layer's (loss_ce, loss_bbox, loss_giou) under `match` [B, T] (detr.py);
    target_classes [B, T]."""
    num_queries, no_object = logits.shape[1], logits.shape[-1] - 1
    assigned = (match[..., None] == jnp.arange(num_queries)) & valid[..., None]  # [B, T, Q]
    is_matched = jnp.any(assigned, axis=1)  # [B, Q]
    # A query is matched to at most one target, so the sum picks that target's class.
    matched_class = jnp.sum(assigned * target_classes[..., None], axis=1)
    classes = jnp.where(is_matched, matched_class, no_object)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, classes[..., None], axis=-1)[..., 0]
    # F.cross_entropy with class weights (no-object eos_coef) divides by the summed weights.
    weight = jnp.where(is_matched, 1.0, eos_coef)
    loss_ce = jnp.sum(weight * nll) / jnp.sum(weight)
    mask = valid.astype(jnp.float32)
    matched = _gather_queries(boxes, match)
    loss_bbox = jnp.sum(mask[..., None] * jnp.abs(matched - target_boxes)) / num_boxes
    giou = _paired_giou(matched, jnp.where(valid[..., None], target_boxes, matched))
    loss_giou = jnp.sum(mask * (1.0 - giou)) / num_boxes
    return loss_ce, loss_bbox, loss_giou


def detr_loss(
    pred_logits: jax.Array,
    pred_boxes: jax.Array,
    target_boxes: jax.Array,
    target_classes: jax.Array,
    target_valid: jax.Array,
    *,
    axis_name: Optional[str] = None,
    cost_class: float = 1.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    ce_weight: float = 1.0,
    bbox_weight: float = 5.0,
    giou_weight: float = 2.0,
    eos_coef: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
    """DETR's SetCriterion with auxiliary losses (facebookresearch/detr models/detr.py).

    pred_logits [L, B, Q, C+1] and pred_boxes [L, B, Q, 4] (cxcywh in [0, 1]) of every decoder
    layer; target_boxes [B, T, 4] cxcywh, target_classes [B, T] in [0, C), target_valid [B, T]
    bool. Each layer is matched on its own; the box terms divide by the valid-box count averaged
    over devices, at least 1, as the official all-reduce. Returns (total over layers, metrics of
    the last layer: loss_ce, loss_bbox, loss_giou unweighted, the last layer's match [B, T]).
    """
    num_layers, batch, num_queries = pred_logits.shape[:3]
    num_targets = target_boxes.shape[1]
    target_boxes = target_boxes.astype(jnp.float32)
    pred_boxes = pred_boxes.astype(jnp.float32)
    classes = _per_target(target_classes, target_boxes)
    valid = target_valid.astype(bool)
    count = jnp.sum(valid.astype(jnp.float32))
    num_boxes = jax.lax.pmean(count, axis_name) if axis_name is not None else count
    num_boxes = jnp.maximum(num_boxes, 1.0)

    cost = jax.vmap(
        lambda lg, bx: detr_match_cost(
            lg,
            bx,
            target_boxes,
            target_class=classes,
            cost_class=cost_class,
            cost_bbox=cost_bbox,
            cost_giou=cost_giou,
        )
    )(pred_logits, pred_boxes)
    # One host call for every layer's matching.
    match = matching.hungarian_match(
        cost.reshape(num_layers * batch, num_queries, num_targets),
        jnp.tile(valid, (num_layers, 1)),
    ).reshape(num_layers, batch, num_targets)

    per_layer = jax.vmap(
        lambda lg, bx, m: _detr_layer_losses(
            lg, bx, m, target_boxes, classes, valid, num_boxes, eos_coef=eos_coef
        )
    )(pred_logits, pred_boxes, match)
    loss_ce, loss_bbox, loss_giou = per_layer  # each [L]
    total = jnp.sum(ce_weight * loss_ce + bbox_weight * loss_bbox + giou_weight * loss_giou)
    metrics = dict(loss_ce=loss_ce[-1], loss_bbox=loss_bbox[-1], loss_giou=loss_giou[-1])
    return total, metrics, match[-1]


def detreg_loss(
    pred_logits: jax.Array,
    pred_boxes: jax.Array,
    pred_embed: jax.Array,
    target_boxes: jax.Array,
    target_valid: jax.Array,
    target_embed: jax.Array,
    *,
    axis_name: Optional[str] = None,
    target_class: int = 1,
    cost_class: float = 1.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    ce_weight: float = 1.0,
    bbox_weight: float = 5.0,
    giou_weight: float = 2.0,
    embed_weight: float = 1.0,
    eos_coef: float = 0.1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DETReg's criterion, DETR variant (amirbar/DETReg models/detr.py SetCriterion).

    pred_logits [L, B, Q, C+1] and pred_boxes [L, B, Q, 4] (cxcywh in [0, 1]) of every decoder
    layer, pred_embed [B, Q, E] of the last; target_boxes [B, T, 4] cxcywh, target_valid [B, T]
    bool, target_embed [B, T, E]. Each layer is matched on its own (auxiliary losses); the box
    terms divide by the valid-box count averaged over devices, at least 1, as the official
    all-reduce; the embedding L1 is the mean over matched (pair, dimension) entries of this device.
    Returns (total, metrics of the last layer: loss_ce, loss_bbox, loss_giou,
    loss_object_embedding, unweighted).
    """
    total, metrics, match = detr_loss(
        pred_logits,
        pred_boxes,
        target_boxes,
        jnp.full(target_valid.shape, target_class, jnp.int32),
        target_valid,
        axis_name=axis_name,
        cost_class=cost_class,
        cost_bbox=cost_bbox,
        cost_giou=cost_giou,
        ce_weight=ce_weight,
        bbox_weight=bbox_weight,
        giou_weight=giou_weight,
        eos_coef=eos_coef,
    )
    valid = target_valid.astype(bool)
    count = jnp.sum(valid.astype(jnp.float32))
    mask = valid.astype(jnp.float32)[..., None]
    embed = _gather_queries(pred_embed.astype(jnp.float32), match)
    entries = jnp.maximum(count, 1.0) * pred_embed.shape[-1]
    loss_embed = jnp.sum(mask * jnp.abs(embed - target_embed.astype(jnp.float32))) / entries
    metrics["loss_object_embedding"] = loss_embed
    return total + embed_weight * loss_embed, metrics
