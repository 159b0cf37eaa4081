"""Geometric views of an image and its FH mask, cropped and flipped together (stateless, seeded).

Only geometry lives here; colour augmentation runs on device (detcon/augment.py).  The mask is
cropped with the same window and flipped with the same coin as the image, and resized with nearest
neighbour so it keeps integer segment ids; both resizes use half-pixel centres, so they line up.
"""

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
    """Returns (offset [y, x], size [h, w]) of a random crop: area min_area-100%, aspect 3/4-4/3."""
    whole_image = tf.constant([[[0.0, 0.0, 1.0, 1.0]]])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=whole_image,
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=CROP_ASPECT_RANGE,
        area_range=(min_area, CROP_AREA_RANGE[1]),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    # After 10 failed attempts (extreme aspect ratios) the op returns the whole image.
    return begin[:2], size[:2]


def crop_flip_resize(
    image: tf.Tensor,
    mask: tf.Tensor,
    offset: tf.Tensor,
    size: tf.Tensor,
    flip: tf.Tensor,
    image_size: int,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns float32 `[S, S, 3]`, int32 `[S, S]`: a window of image `[H, W, 3]` and mask."""
    image = tf.slice(image, tf.stack([offset[0], offset[1], 0]), tf.stack([size[0], size[1], 3]))
    mask = tf.slice(mask, offset, size)
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    mask = tf.cond(flip, lambda: tf.reverse(mask, axis=[1]), lambda: mask)
    view = _resize_image(image, image_size)
    view_mask = tf.image.resize(
        mask[..., None], [image_size, image_size], method=tf.image.ResizeMethod.NEAREST_NEIGHBOR
    )[..., 0]
    return view, view_mask


def random_view(
    image: tf.Tensor,
    mask: tf.Tensor,
    image_size: int,
    seed: tf.Tensor,
    min_area: float = CROP_AREA_RANGE[0],
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns a random view, float32 `[S, S, 3]` + int32 `[S, S]`, of image `[H, W, 3]`, mask."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    offset, size = random_crop_window(tf.shape(image), crop_seed, min_area)
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    return crop_flip_resize(image, mask, offset, size, flip, image_size)


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
