"""Synthetic pretraining batches keyed by (seed, step, global example index); no TensorFlow."""

import numpy as np


def mock_example(
    seed: int,
    step: int,
    index: int,
    image_size: int,
    num_classes: int,
    num_regions: int = 4,
    num_boxes: int = 0,
) -> dict[str, np.ndarray]:
    """One example: two views [S, S, 3] in [0, 1] of coloured rectangles, their id maps, a label.

    num_boxes > 0 adds region priors for DETReg (DataNeeds.num_regions): the rectangles' boxes
    region_boxes [num_boxes, 4] (cxcywh over the image side, zero-padded), region_valid
    [num_boxes] and pad_mask [S, S] (all True: the image fills the canvas).
    """
    rng = np.random.default_rng([seed, step, index])
    s = image_size
    image = np.empty((s, s, 3), np.float32)
    ids = np.zeros((s, s), np.int32)
    image[:] = rng.uniform(0.0, 1.0, size=3)
    rects = []
    for region in range(1, num_regions + 1):
        y0, x0 = rng.integers(0, s - s // 4, size=2)
        h, w = rng.integers(s // 4, s // 2 + 1, size=2)
        image[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0.0, 1.0, size=3)
        ids[y0 : y0 + h, x0 : x0 + w] = region
        # Clipped to the canvas, as the array slices above are.
        rects.append((x0, y0, min(x0 + w, s), min(y0 + h, s)))
    image += rng.normal(0.0, 0.05, size=image.shape).astype(np.float32)
    np.clip(image, 0.0, 1.0, out=image)
    # The second view is a horizontal flip: masks follow their pixels, as the real pipeline does.
    # At most num_regions + 1 ids per view, well under max_mask_id: nothing is folded.
    example = dict(
        view1=image,
        view2=image[:, ::-1].copy(),
        fh_mask1=ids,
        fh_mask2=ids[:, ::-1].copy(),
        folded_segments=np.int32(0),
        label=np.int32(rng.integers(0, num_classes)),
    )
    if num_boxes > 0:
        example.update(region_priors(rects, s, num_boxes))
    return example


def region_priors(rects: list, image_size: int, num_boxes: int) -> dict[str, np.ndarray]:
    """DETReg batch keys from pixel boxes (x0, y0, x1, y1): the first num_boxes as cxcywh over
    the image side, zero-padded with region_valid False, and an all-True pad_mask [S, S]."""
    boxes = np.zeros((num_boxes, 4), np.float32)
    valid = np.zeros((num_boxes,), bool)
    for i, (x0, y0, x1, y1) in enumerate(rects[:num_boxes]):
        boxes[i] = ((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0)
        valid[i] = True
    return dict(
        pad_mask=np.ones((image_size, image_size), bool),
        region_boxes=boxes / np.float32(image_size),
        region_valid=valid,
    )


def mock_batch(
    seed: int,
    step: int,
    indices: np.ndarray,
    image_size: int,
    num_classes: int,
    num_boxes: int = 0,
) -> dict[str, np.ndarray]:
    """Stacks mock_example over global example indices [n] -> arrays with leading dim n."""
    examples = [
        mock_example(seed, step, int(i), image_size, num_classes, num_boxes=num_boxes)
        for i in indices
    ]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch["index"] = np.asarray(indices, np.int32)
    return batch


def device_batch(
    seed: int,
    step: int,
    local_devices: int,
    per_device: int,
    image_size: int,
    num_classes: int,
    first_index: int = 0,
    num_boxes: int = 0,
) -> dict[str, np.ndarray]:
    """mock_batch of global indices first_index.. laid out [local_devices, per_device, ...]."""
    indices = np.arange(first_index, first_index + local_devices * per_device, dtype=np.int32)
    flat = mock_batch(seed, step, indices, image_size, num_classes, num_boxes)
    return {k: v.reshape((local_devices, per_device) + v.shape[1:]) for k, v in flat.items()}
