"""Synthetic pretraining batches keyed by (seed, step, global example index); no TensorFlow."""

import numpy as np


def mock_example(
    seed: int, step: int, index: int, image_size: int, num_classes: int, num_regions: int = 4
) -> dict[str, np.ndarray]:
    """One example: two views [S, S, 3] in [0, 1] of coloured rectangles, their id maps, a label."""
    rng = np.random.default_rng([seed, step, index])
    s = image_size
    image = np.empty((s, s, 3), np.float32)
    ids = np.zeros((s, s), np.int32)
    image[:] = rng.uniform(0.0, 1.0, size=3)
    for region in range(1, num_regions + 1):
        y0, x0 = rng.integers(0, s - s // 4, size=2)
        h, w = rng.integers(s // 4, s // 2 + 1, size=2)
        image[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0.0, 1.0, size=3)
        ids[y0 : y0 + h, x0 : x0 + w] = region
    image += rng.normal(0.0, 0.05, size=image.shape).astype(np.float32)
    np.clip(image, 0.0, 1.0, out=image)
    # The second view is a horizontal flip: masks follow their pixels, as the real pipeline does.
    # At most num_regions + 1 ids per view, well under max_mask_id: nothing is folded.
    return dict(
        view1=image,
        view2=image[:, ::-1].copy(),
        fh_mask1=ids,
        fh_mask2=ids[:, ::-1].copy(),
        folded_segments=np.int32(0),
        label=np.int32(rng.integers(0, num_classes)),
    )


def mock_batch(
    seed: int, step: int, indices: np.ndarray, image_size: int, num_classes: int
) -> dict[str, np.ndarray]:
    """Stacks mock_example over global example indices [n] -> arrays with leading dim n."""
    examples = [mock_example(seed, step, int(i), image_size, num_classes) for i in indices]
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
) -> dict[str, np.ndarray]:
    """mock_batch of global indices first_index.. laid out [local_devices, per_device, ...]."""
    indices = np.arange(first_index, first_index + local_devices * per_device, dtype=np.int32)
    flat = mock_batch(seed, step, indices, image_size, num_classes)
    return {k: v.reshape((local_devices, per_device) + v.shape[1:]) for k, v in flat.items()}
