"""Objectives as pure `jnp` functions: the DetCon-B contrastive loss and a linear-probe loss."""
from typing import Optional

import jax
import jax.numpy as jnp

# Subtracted from logits that must leave the softmax; finite (unlike -inf) so that gradients
# and fully masked rows stay NaN-free.
_LARGE_NUM = 1e9


def l2_normalize(x: jax.Array, axis: int = -1, epsilon: float = 1e-12) -> jax.Array:
    """x / max(||x||, sqrt(epsilon)) along `axis`, same shape as x (a zero vector stays zero)."""
    squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, epsilon))


def _view_loss(pred: jax.Array, pind: jax.Array, cross_target: jax.Array,
               cross_tind: jax.Array, same_target: jax.Array, same_tind: jax.Array,
               same_image: jax.Array, temperature: float) -> jax.Array:
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
    # padding rois (negative id, see detcon.masks.NO_MASK_ID) are not candidates at all.
    logits_cross = logits_cross - _LARGE_NUM * (cross_tind < 0)[None, None].astype(pred.dtype)
    logits_same = logits_same - _LARGE_NUM * (
        same_same | (same_tind < 0)[None, None]).astype(pred.dtype)
    logits = jnp.concatenate([logits_cross.reshape(batch, num_rois, -1),
                              logits_same.reshape(batch, num_rois, -1)], axis=-1)

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


def detcon_b_loss(pred1: jax.Array, pred2: jax.Array, target1: jax.Array, target2: jax.Array,
                  pind1: jax.Array, pind2: jax.Array, tind1: jax.Array, tind2: jax.Array, *,
                  temperature: float = 0.1, axis_name: Optional[str] = None) -> jax.Array:
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
        l2_normalize(x.astype(jnp.float32)) for x in (pred1, pred2, target1, target2))

    if axis_name is not None:
        target1, target2, tind1, tind2 = jax.lax.all_gather(
            (target1, target2, tind1, tind2), axis_name, tiled=True)
        offset = jax.lax.axis_index(axis_name) * batch
    else:
        offset = 0
    candidate_images = jnp.arange(target1.shape[0])
    same_image = (jnp.arange(batch) + offset)[:, None] == candidate_images[None, :]

    loss_1 = _view_loss(pred1, pind1, target2, tind2, target1, tind1, same_image, temperature)
    loss_2 = _view_loss(pred2, pind2, target1, tind1, target2, tind2, same_image, temperature)
    return loss_1 + loss_2


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
