"""Geometric views of an image and its FH mask, cropped and flipped together (stateless, seeded).

Only geometry lives here; colour augmentation runs on device (detcon/ops/augment.py).  The mask is
cropped with the same window and flipped with the same coin as the image, and resized with nearest
neighbour so it keeps integer segment ids; both resizes use half-pixel centres, so they line up.
"""

import math

import tensorflow as tf

CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
EVAL_CROP_FRACTION = 0.875


def _resize_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """Returns float32 `[S, S, 3]` in [0, 1] from uint8 `[h, w, 3]` (bicubic, as in BYOL/DetCon)."""
    resized = tf.image.resize(image, [size, size], method=tf.image.ResizeMethod.BICUBIC)
    return tf.clip_by_value(resized / 255.0, 0.0, 1.0)


def random_crop_window(
    image_shape: tf.Tensor, seed: tf.Tensor, min_area: float = CROP_AREA_RANGE[0]
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns int32 (offset [y, x], size [h, w]) of a random crop: the released DetCon formula.

    Target area U(min_area, 1) of the image (0.08 by default; MoCo v2 uses 0.2), aspect ratio w/h
    log-uniform in [3/4, 4/3], sides rounded and clamped to the image, offsets uniform over the
    valid positions. Unlike tf.image.sample_distorted_bounding_box it never rejects a draw, so
    large crops keep their share (mean area 52% on a 500 x 375 image, against 36% for the
    rejection sampler).
    """
    height, width = image_shape[0], image_shape[1]
    area_seed, ratio_seed, y_seed, x_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=4)
    )
    if not 0.0 < min_area <= CROP_AREA_RANGE[1]:
        raise ValueError(f"crop_min_area must be in (0, 1], got {min_area}.")
    area = tf.cast(height * width, tf.float32) * tf.random.stateless_uniform(
        [], area_seed, min_area, CROP_AREA_RANGE[1]
    )
    log_low, log_high = (math.log(r) for r in CROP_ASPECT_RANGE)
    ratio = tf.exp(tf.random.stateless_uniform([], ratio_seed, log_low, log_high))
    # At least one pixel: the released code can give 0 on images under ~4 pixels a side.
    crop_width = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32), 1, width)
    crop_height = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32), 1, height)
    top = tf.random.stateless_uniform(
        [], y_seed, minval=0, maxval=height - crop_height + 1, dtype=tf.int32
    )
    left = tf.random.stateless_uniform(
        [], x_seed, minval=0, maxval=width - crop_width + 1, dtype=tf.int32
    )
    return tf.stack([top, left]), tf.stack([crop_height, crop_width])


def crop_flip_resize_image(
    image: tf.Tensor, offset: tf.Tensor, size: tf.Tensor, flip: tf.Tensor, image_size: int
) -> tf.Tensor:
    """Returns float32 `[S, S, 3]`: the window `offset`, `size` of image `[H, W, 3]`, flipped."""
    image = tf.slice(image, tf.stack([offset[0], offset[1], 0]), tf.stack([size[0], size[1], 3]))
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    return _resize_image(image, image_size)


def crop_flip_resize(
    image: tf.Tensor,
    mask: tf.Tensor,
    offset: tf.Tensor,
    size: tf.Tensor,
    flip: tf.Tensor,
    image_size: int,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns float32 `[S, S, 3]`, int32 `[S, S]`: a window of image `[H, W, 3]` and mask."""
    view = crop_flip_resize_image(image, offset, size, flip, image_size)
    mask = tf.slice(mask, offset, size)
    mask = tf.cond(flip, lambda: tf.reverse(mask, axis=[1]), lambda: mask)
    view_mask = tf.image.resize(
        mask[..., None], [image_size, image_size], method=tf.image.ResizeMethod.NEAREST_NEIGHBOR
    )[..., 0]
    return view, view_mask


def reindex_segments(mask: tf.Tensor, max_mask_id: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns int32 ids `[H, W]` renumbered 0..K-1 by first appearance, and the folded count.

    FH numbers segments in raster order over the whole image, so a crop of a large image can
    hold ids far above `max_mask_id` that the device would ignore.  Renumbering the segments
    present in the view keeps every pixel for up to `max_mask_id` segments; beyond that the
    later segments are merged into id `max_mask_id - 1`, and how many were merged
    (max(K - max_mask_id, 0)) is returned.  Negative ids (no segment) stay -1.
    """
    if max_mask_id < 1:
        raise ValueError(f"max_mask_id must be >= 1, got {max_mask_id}")
    flat = tf.reshape(tf.cast(mask, tf.int32), [-1])
    valid = flat >= 0
    # tf.unique lists values in order of first appearance; all negatives share one entry.
    values, position = tf.unique(tf.where(valid, flat, -1))
    is_segment = values >= 0
    rank = tf.cumsum(tf.cast(is_segment, tf.int32)) - 1  # order among non-negative ids only
    renumbered = tf.minimum(tf.gather(rank, position), max_mask_id - 1)
    ids = tf.reshape(tf.where(valid, renumbered, -1), tf.shape(mask))
    num_segments = tf.reduce_sum(tf.cast(is_segment, tf.int32))
    return ids, tf.maximum(num_segments - max_mask_id, 0)


def _random_geometry(
    image: tf.Tensor, seed: tf.Tensor, min_area: float
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(offset, size, flip) of a random view of image `[H, W, 3]`, drawn from `seed`."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    offset, size = random_crop_window(tf.shape(image), crop_seed, min_area)
    return offset, size, tf.random.stateless_uniform([], flip_seed) < 0.5


def random_view(
    image: tf.Tensor,
    mask: tf.Tensor,
    image_size: int,
    seed: tf.Tensor,
    min_area: float = CROP_AREA_RANGE[0],
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns a random view, float32 `[S, S, 3]` + int32 `[S, S]`, of image `[H, W, 3]`, mask."""
    return crop_flip_resize(image, mask, *_random_geometry(image, seed, min_area), image_size)


def random_image_view(
    image: tf.Tensor, image_size: int, seed: tf.Tensor, min_area: float = CROP_AREA_RANGE[0]
) -> tf.Tensor:
    """random_view's image `[S, S, 3]` alone (same seed, same view), for methods without masks."""
    return crop_flip_resize_image(image, *_random_geometry(image, seed, min_area), image_size)


def centre_view(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Returns float32 `[S, S, 3]`: shorter side resized to S / 0.875, then the centre S x S."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    resize_to = tf.math.ceil(image_size / EVAL_CROP_FRACTION)
    scale = resize_to / tf.reduce_min(shape)
    new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), image_size)
    resized = tf.image.resize(image, new_shape, method=tf.image.ResizeMethod.BICUBIC)
    top = (new_shape[0] - image_size) // 2
    left = (new_shape[1] - image_size) // 2
    crop = resized[top : top + image_size, left : left + image_size]
    crop.set_shape([image_size, image_size, 3])
    return tf.clip_by_value(crop / 255.0, 0.0, 1.0)
