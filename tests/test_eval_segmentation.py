"""Segmentation probe math: confusion matrix and IoU by hand, 255 ignored; the head learns."""

import jax.numpy as jnp
import numpy as np
import pytest

from detcon.evaluation import segmentation as seg


def test_confusion_and_iou_by_hand():
    labels = np.array([[0, 0, 1, 1], [2, 2, 255, 255], [0, 1, 2, 255]])
    preds = np.array(
        [
            [0, 1, 1, 1],
            [2, 0, 2, 0],  # predictions under 255 must not count
            [0, 1, 1, 3],
        ]
    )
    confusion = seg.confusion_matrix(preds, labels, num_classes=4)
    # rows true, columns predicted
    want = np.array([[2, 1, 0, 0], [0, 3, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(confusion, want)
    metrics = seg.iou_metrics(confusion)
    # class 0: I=2, U=3+3-2=4; class 1: I=3, U=3+5-3=5; class 2: I=1, U=3+1-1=3; class 3: U=0.
    assert metrics["per_class_iou"][:3] == pytest.approx([2 / 4, 3 / 5, 1 / 3])
    assert metrics["per_class_iou"][3] is None
    assert metrics["miou"] == pytest.approx((2 / 4 + 3 / 5 + 1 / 3) / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(6 / 9)


def test_class_only_predicted_counts_in_miou():
    # Class 1 never occurs but is predicted: union > 0, IoU 0, so it lowers the mean.
    metrics = seg.iou_metrics(seg.confusion_matrix(np.array([0, 1]), np.array([0, 0]), 2))
    assert metrics["per_class_iou"] == [0.5, 0.0]
    assert metrics["miou"] == pytest.approx(0.25)


def test_labels_out_of_range_are_refused():
    with pytest.raises(ValueError, match="255"):
        seg.confusion_matrix(np.zeros(3), np.array([0, 7, 255]), 3)


def test_pixel_cross_entropy_ignores_255():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(2, 3, 4))
    labels[0, 0, :] = 255
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    valid = labels != 255
    picked = np.take_along_axis(log_probs, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    want = -picked[valid].mean()
    got = seg.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_upsampling_is_bilinear_with_half_pixel_centres():
    logits = jnp.array([0.0, 4.0]).reshape(1, 1, 2, 1)
    up = np.asarray(seg.upsample_logits(logits, 1, 4))[0, 0, :, 0]
    # Output centres at input coordinates -0.25, 0.25, 0.75, 1.25 (clamped at the edges).
    np.testing.assert_allclose(up, [0.0, 1.0, 3.0, 4.0], atol=1e-6)


def test_head_learns_separable_maps():
    """Channel c lights up where class c is: the trained head reaches mIoU 1 at 4x resolution."""
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 3, size=(12, 4, 4))
    maps = np.eye(3, dtype=np.float32)[classes] * 3 + rng.normal(0, 0.1, (12, 4, 4, 3))
    labels = np.kron(classes, np.ones((4, 4), int)).astype(np.uint8)  # nearest upsampling
    labels[:, 0, :] = 255
    # Bilinear logits blur class borders; score only block centres, where they are exact.
    centre = np.full_like(labels, 255)
    centre[:, 1::4, 1::4] = labels[:, 1::4, 1::4]
    head, shift, scale = seg.train_head(
        maps, labels, 3, epochs=40, batch_size=4, learning_rate=0.05
    )
    metrics = seg.evaluate_head(head, shift, scale, maps, centre, 3, batch_size=5)
    assert metrics["miou"] == pytest.approx(1.0)
    assert metrics["pixel_accuracy"] == pytest.approx(1.0)
