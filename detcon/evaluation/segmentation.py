"""Linear segmentation probe: a 1x1 classifier on a frozen stride-32 feature map.

The logits are bilinearly upsampled to label resolution and trained with cross-entropy, label 255
ignored. Metrics follow MMSegmentation's IoU metric: per-class IoU from a confusion matrix summed
over the whole set, mIoU as the mean over classes whose union is non-empty.
"""

from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

IGNORE_LABEL = 255


def upsample_logits(logits: jax.Array, height: int, width: int) -> jax.Array:
    """Bilinear (half-pixel centres) resize of logits [N, h, w, K] -> [N, height, width, K]."""
    n, _, _, k = logits.shape
    return jax.image.resize(logits, (n, height, width, k), method="bilinear")


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over pixels of labels [N, H, W] that are not IGNORE_LABEL."""
    valid = labels != IGNORE_LABEL
    safe = jnp.where(valid, labels, 0)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    return jnp.sum(per_pixel * valid) / jnp.maximum(jnp.sum(valid), 1)


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] counts, rows = true class, columns = predicted; IGNORE_LABEL pixels left out."""
    labels = np.asarray(labels).ravel().astype(np.int64)
    predictions = np.asarray(predictions).ravel().astype(np.int64)
    keep = labels != IGNORE_LABEL
    if np.any(labels[keep] >= num_classes) or np.any(labels[keep] < 0):
        raise ValueError(f"Labels must lie in [0, {num_classes}) or be {IGNORE_LABEL} (ignored).")
    flat = labels[keep] * num_classes + predictions[keep]
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_metrics(confusion: np.ndarray) -> dict[str, Any]:
    """mIoU over classes with a non-empty union, per-class IoU (None: empty), pixel accuracy."""
    confusion = np.asarray(confusion, np.float64)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    iou = np.where(present, intersection / np.maximum(union, 1), np.nan)
    total = confusion.sum()
    return {
        "miou": float(np.mean(iou[present])) if present.any() else float("nan"),
        "per_class_iou": [float(v) if ok else None for v, ok in zip(iou, present)],
        "pixel_accuracy": float(intersection.sum() / total) if total else float("nan"),
    }


def standardisation(feature_maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, 1/std) [C] of maps [N, h, w, C]; an affine map the linear head absorbs."""
    flat = feature_maps.reshape(-1, feature_maps.shape[-1]).astype(np.float64)
    return flat.mean(0).astype(np.float32), (1.0 / (flat.std(0) + 1e-6)).astype(np.float32)


def head_logits(
    head: dict, feature_maps: jax.Array, shift: jax.Array, scale: jax.Array
) -> jax.Array:
    """1x1 linear classifier on standardised maps [N, h, w, C] -> logits [N, h, w, K]."""
    x = (feature_maps.astype(jnp.float32) - shift) * scale
    return x @ head["w"] + head["b"]


def _minibatches(num: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Shuffled index batches of one epoch; the last, partial batch is padded by repetition."""
    order = rng.permutation(num)
    for start in range(0, num, batch_size):
        index = order[start : start + batch_size]
        if len(index) < batch_size:  # keeps one compiled shape
            index = np.resize(index, batch_size)
        yield index


def train_head(
    feature_maps: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float = 1e-4,
    seed: int = 0,
    on_epoch: Optional[Callable[[int, float], None]] = None,
) -> tuple[dict, np.ndarray, np.ndarray]:
    """(head, shift, scale) trained on maps [N, h, w, C], labels [N, H, W] (AdamW, cosine);
    on_epoch(epoch from 1, mean loss) is called after each epoch (progress)."""
    num, _, _, channels = feature_maps.shape
    height, width = labels.shape[1:]
    shift, scale = standardisation(feature_maps)
    batch_size = min(batch_size, num)
    steps = epochs * -(-num // batch_size)
    optimizer = optax.adamw(
        optax.cosine_decay_schedule(learning_rate, max(steps, 1)), weight_decay=weight_decay
    )
    head = {
        "w": jnp.zeros((channels, num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }
    opt_state = optimizer.init(head)

    @jax.jit
    def step(head, opt_state, maps, batch_labels):
        def loss_fn(h):
            logits = upsample_logits(head_logits(h, maps, shift, scale), height, width)
            return pixel_cross_entropy(logits, batch_labels)

        loss, grads = jax.value_and_grad(loss_fn)(head)
        updates, opt_state = optimizer.update(grads, opt_state, head)
        return optax.apply_updates(head, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for epoch in range(1, epochs + 1):
        losses = []
        for index in _minibatches(num, batch_size, rng):
            head, opt_state, loss = step(head, opt_state, feature_maps[index], labels[index])
            losses.append(loss)
        if on_epoch is not None:
            on_epoch(epoch, float(np.mean(jax.device_get(losses))))
    return jax.device_get(head), shift, scale


def evaluate_head(
    head: dict,
    shift: np.ndarray,
    scale: np.ndarray,
    feature_maps: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    batch_size: int,
) -> dict[str, Any]:
    """IoU metrics of the head's argmax on maps [N, h, w, C] against labels [N, H, W]."""
    height, width = labels.shape[1:]

    @jax.jit
    def predict(maps):
        logits = upsample_logits(head_logits(head, maps, shift, scale), height, width)
        return jnp.argmax(logits, axis=-1)

    confusion = np.zeros((num_classes, num_classes), np.int64)
    for start in range(0, len(labels), batch_size):
        maps = feature_maps[start : start + batch_size]
        count = len(maps)
        if count < batch_size:
            maps = np.concatenate([maps, np.repeat(maps[-1:], batch_size - count, 0)])
        predictions = np.asarray(predict(maps))[:count]
        confusion += confusion_matrix(predictions, labels[start : start + count], num_classes)
    return iou_metrics(confusion)
