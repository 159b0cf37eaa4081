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
# released: DetCon/BYOL's never-rejecting formula (detcon utils/tf_image_ops.py, byol
# utils/dataset.py); torchvision: RandomResizedCrop.get_params (MoCo v2, DenseCL, DetCo);
# tf_distorted_bbox: tf.image.sample_distorted_bounding_box as SimCLR's data_util.crop_and_resize.
CROP_SAMPLERS = ("released", "torchvision", "tf_distorted_bbox")
TORCHVISION_ATTEMPTS = 10  # RandomResizedCrop.get_params tries 10 draws, then centre-crops
SIMCLR_ATTEMPTS = 100  # SimCLR's max_attempts
SIMCLR_MIN_OBJECT_COVERED = 0.1  # SimCLR's min_object_covered (rejects crops under 10%)


def check_crop_sampler(sampler: str, area_range: tuple[float, float]) -> None:
    """Raises ValueError naming the config field when the sampler or area range is invalid."""
    if sampler not in CROP_SAMPLERS:
        raise ValueError(f"--config.data.crop_sampler={sampler!r}: choose one of {CROP_SAMPLERS}.")
    low, high = area_range
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(
            f"--config.data.crop_min_area: the crop area range must satisfy 0 < min <= 1, "
            f"got {tuple(area_range)}."
        )


def resize_method(sampler: str) -> str:
    """The release's resize filter for a sampler: bilinear for torchvision, else bicubic."""
    return "bilinear" if sampler == "torchvision" else "bicubic"


def _resize_image(image: tf.Tensor, size: int, method: str = "bicubic") -> tf.Tensor:
    """Returns float32 `[S, S, 3]` in [0, 1] from uint8 `[h, w, 3]` (bicubic as BYOL/DetCon/SimCLR;
    bilinear with antialiasing as PIL's resize under torchvision's RandomResizedCrop)."""
    if method == "bilinear":
        resized = tf.image.resize(
            image, [size, size], method=tf.image.ResizeMethod.BILINEAR, antialias=True
        )
    else:
        resized = tf.image.resize(image, [size, size], method=tf.image.ResizeMethod.BICUBIC)
    return tf.clip_by_value(resized / 255.0, 0.0, 1.0)


def _released_window(
    height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor, area_range: tuple[float, float]
) -> tuple[tf.Tensor, tf.Tensor]:
    """The released DetCon/BYOL formula: one draw, sides clamped to the image, never rejected."""
    area_seed, ratio_seed, y_seed, x_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=4)
    )
    area = tf.cast(height * width, tf.float32) * tf.random.stateless_uniform(
        [], area_seed, area_range[0], area_range[1]
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


def _torchvision_window(
    height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor, area_range: tuple[float, float]
) -> tuple[tf.Tensor, tf.Tensor]:
    """RandomResizedCrop.get_params: the first of 10 draws that fits, else a centre crop."""
    area_seed, ratio_seed, y_seed, x_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=4)
    )
    attempts = [TORCHVISION_ATTEMPTS]
    area = tf.cast(height * width, tf.float32) * tf.random.stateless_uniform(
        attempts, area_seed, area_range[0], area_range[1]
    )
    log_low, log_high = (math.log(r) for r in CROP_ASPECT_RANGE)
    ratio = tf.exp(tf.random.stateless_uniform(attempts, ratio_seed, log_low, log_high))
    # int(round(.)) in Python rounds half to even, as tf.round.
    widths = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
    heights = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
    fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # 0 when none fits
    # The fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    image_ratio = tf.cast(width, tf.float32) / tf.cast(height, tf.float32)
    low, high = CROP_ASPECT_RANGE
    tall = image_ratio < low
    wide = image_ratio > high
    fallback_width = tf.where(
        wide, tf.cast(tf.round(tf.cast(height, tf.float32) * high), tf.int32), width
    )
    fallback_height = tf.where(
        tall, tf.cast(tf.round(tf.cast(width, tf.float32) / low), tf.int32), height
    )
    found = tf.reduce_any(fits)
    crop_height = tf.where(found, heights[first], fallback_height)
    crop_width = tf.where(found, widths[first], fallback_width)
    top = tf.where(
        found,
        tf.random.stateless_uniform(
            [], y_seed, minval=0, maxval=height - crop_height + 1, dtype=tf.int32
        ),
        (height - crop_height) // 2,
    )
    left = tf.where(
        found,
        tf.random.stateless_uniform(
            [], x_seed, minval=0, maxval=width - crop_width + 1, dtype=tf.int32
        ),
        (width - crop_width) // 2,
    )
    return tf.stack([top, left]), tf.stack([crop_height, crop_width])


def _distorted_bbox_window(
    image_shape: tf.Tensor, seed: tf.Tensor, area_range: tuple[float, float]
) -> tuple[tf.Tensor, tf.Tensor]:
    """SimCLR's crop: TensorFlow's own sampler with SimCLR's arguments (100 attempts, covering
    at least 10% of the image, aspect 3/4..4/3 of the square output; else the whole image)."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_size=image_shape,
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=SIMCLR_MIN_OBJECT_COVERED,
        aspect_ratio_range=CROP_ASPECT_RANGE,
        area_range=area_range,
        max_attempts=SIMCLR_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.cast(begin[:2], tf.int32), tf.cast(size[:2], tf.int32)


def random_crop_window(
    image_shape: tf.Tensor,
    seed: tf.Tensor,
    *,
    area_range: tuple[float, float] = CROP_AREA_RANGE,
    sampler: str = "released",
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns int32 (offset [y, x], size [h, w]) of a random crop of an image `[H, W, 3]`.

    area_range: crop area as a fraction of the image (0.08-1 BYOL/DetCon/SimCLR, 0.2-1 MoCo v2).
    sampler "released" (DetCon/BYOL): target area uniform in area_range, aspect ratio w/h
    log-uniform in [3/4, 4/3], sides rounded and clamped to the image, offsets uniform over the
    valid positions. It never rejects a draw, so large crops keep their share (mean area 52% on a
    500 x 375 image, against 36% for the rejection samplers). "torchvision": the same draw but
    rejected when a side exceeds the image, up to 10 tries, then the centre crop of the whole
    image at the nearest allowed aspect. "tf_distorted_bbox": tf.image's sampler as SimCLR calls
    it (height uniform over the integers that fit the area range, aspect uniform, 100 tries).
    """
    check_crop_sampler(sampler, area_range)
    area_range = (float(area_range[0]), float(area_range[1]))
    height, width = image_shape[0], image_shape[1]
    if sampler == "torchvision":
        return _torchvision_window(height, width, seed, area_range)
    if sampler == "tf_distorted_bbox":
        return _distorted_bbox_window(image_shape, seed, area_range)
    return _released_window(height, width, seed, area_range)


def crop_flip_resize_image(
    image: tf.Tensor,
    offset: tf.Tensor,
    size: tf.Tensor,
    flip: tf.Tensor,
    image_size: int,
    method: str = "bicubic",
) -> tf.Tensor:
    """Returns float32 `[S, S, 3]`: the window `offset`, `size` of image `[H, W, 3]`, flipped."""
    image = tf.slice(image, tf.stack([offset[0], offset[1], 0]), tf.stack([size[0], size[1], 3]))
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    return _resize_image(image, image_size, method)


def crop_flip_resize(
    image: tf.Tensor,
    mask: tf.Tensor,
    offset: tf.Tensor,
    size: tf.Tensor,
    flip: tf.Tensor,
    image_size: int,
    method: str = "bicubic",
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns float32 `[S, S, 3]`, int32 `[S, S]`: a window of image `[H, W, 3]` and mask."""
    view = crop_flip_resize_image(image, offset, size, flip, image_size, method)
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
    image: tf.Tensor, seed: tf.Tensor, area_range: tuple[float, float], sampler: str
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(offset, size, flip) of a random view of image `[H, W, 3]`, drawn from `seed`."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    offset, size = random_crop_window(
        tf.shape(image), crop_seed, area_range=area_range, sampler=sampler
    )
    return offset, size, tf.random.stateless_uniform([], flip_seed) < 0.5


def random_view(
    image: tf.Tensor,
    mask: tf.Tensor,
    image_size: int,
    seed: tf.Tensor,
    area_range: tuple[float, float] = CROP_AREA_RANGE,
    sampler: str = "released",
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns a random view, float32 `[S, S, 3]` + int32 `[S, S]`, of image `[H, W, 3]`, mask."""
    geometry = _random_geometry(image, seed, area_range, sampler)
    return crop_flip_resize(image, mask, *geometry, image_size, resize_method(sampler))


def random_image_view(
    image: tf.Tensor,
    image_size: int,
    seed: tf.Tensor,
    area_range: tuple[float, float] = CROP_AREA_RANGE,
    sampler: str = "released",
) -> tf.Tensor:
    """random_view's image `[S, S, 3]` alone (same seed, same view), for methods without masks."""
    geometry = _random_geometry(image, seed, area_range, sampler)
    return crop_flip_resize_image(image, *geometry, image_size, resize_method(sampler))


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
