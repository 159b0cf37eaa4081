"""DETReg inputs: per-sample top-k region priors and DETR's multi-scale augmentation on a canvas.

The official pretraining (amirbar/DETReg `datasets/selfdet.py:72-74,140-161`, transforms from
`datasets/transforms.py`, i.e. DETR's) takes the first 30 selective-search boxes, then:
horizontal flip (p 0.5); then with p 0.5 resize the shorter side to one of SCALES (longer side at
most 600); otherwise resize the shorter side to one of CROP_RESIZES, crop a random w, h in
[384, min(side, 600)] (boxes clipped, empty ones dropped), and resize to one of SCALES (max 600).
Batches are zero-padded to their largest image with a mask, boxes given as cxcywh normalised by
the unpadded image.

JAX needs static shapes, so here every image lands at the top-left of one S x S canvas
(S = config.data.image_size) with a mask. The canvas rule: every official pixel size is scaled by
S / 600 and rounded (`scaled_sizes`), so the maximum side 600 becomes S and every image fits; the
official rounding can overshoot max_size by a pixel or two, which is clamped to S. At S = 600 the
recipe is the official one.

An image left with fewer than 2 boxes: the official draws another image; here the augmentation
(flip, branch, sizes, crop) is drawn again, up to MAX_ATTEMPTS times, and then the image is kept
uncropped (the resize branch, which keeps every box). Ranks are drawn once per sample.
"""

from typing import NamedTuple

import tensorflow as tf

OFFICIAL_MAX_SIZE = 600
SCALES = (320, 336, 352, 368, 400, 416, 432, 448, 464, 480)
CROP_RESIZES = (400, 500, 600)
CROP_MIN = 384
MAX_ATTEMPTS = 10
MIN_BOXES = 2  # selfdet.py:93-94,104-105: fewer than 2 boxes and the sample is redrawn


class ScaledSizes(NamedTuple):
    """The official pixel sizes scaled to a canvas of side `max_size`."""

    scales: tuple[int, ...]
    crop_resizes: tuple[int, ...]
    crop_min: int
    crop_max: int
    max_size: int


def scaled_sizes(canvas: int) -> ScaledSizes:
    """Returns the official sizes times canvas / 600, rounded (at least 1 pixel)."""
    if canvas < 1:
        raise ValueError(f"config.data.image_size must be >= 1, got {canvas}")

    def scale(size: int) -> int:
        return max(1, round(size * canvas / OFFICIAL_MAX_SIZE))

    return ScaledSizes(
        scales=tuple(scale(s) for s in SCALES),
        crop_resizes=tuple(scale(s) for s in CROP_RESIZES),
        crop_min=scale(CROP_MIN),
        crop_max=canvas,
        max_size=canvas,
    )


def top_regions(
    boxes: tf.Tensor, box_index: tf.Tensor, levels: tf.Tensor, k: int, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns the first k boxes float32 `[k, 4]` of one rank draw and bool `[k]` valid.

    Each region `[R]` gets rank U(0,1) x level, a box `[U, 4]` the smallest rank of its regions
    (OpenCV keeps a rect's first occurrence after sorting), boxes are sorted by rank.
    """
    uniforms = tf.random.stateless_uniform(tf.shape(levels), seed, dtype=tf.float64)
    ranks = uniforms * tf.cast(levels, tf.float64)
    box_ranks = tf.math.unsorted_segment_min(ranks, box_index, tf.shape(boxes)[0])
    order = tf.argsort(box_ranks, stable=True)[:k]
    chosen = tf.gather(boxes, order)
    count = tf.shape(chosen)[0]
    padded = tf.pad(chosen, [[0, k - count], [0, 0]])
    padded.set_shape([k, 4])
    return padded, tf.range(k) < count


def resized_shape(
    height: tf.Tensor, width: tf.Tensor, size: tf.Tensor, max_size: int | None
) -> tf.Tensor:
    """Returns int32 `[..., 2]` (h, w): DETR's `get_size_with_aspect_ratio` (shorter side to
    `size`, longer side at most `max_size`), elementwise over `[...]` inputs."""
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    size = tf.cast(size, tf.float64)
    if max_size is not None:
        short, long = tf.minimum(h, w), tf.maximum(h, w)
        size = tf.where(long / short * size > max_size, tf.round(max_size * short / long), size)
    keep = ((w <= h) & (w == size)) | ((h <= w) & (h == size))
    out_h = tf.where(keep, h, tf.where(w < h, tf.floor(size * h / w), size))
    out_w = tf.where(keep, w, tf.where(w < h, size, tf.floor(size * w / h)))
    if max_size is not None:  # the official rounding can overshoot by a pixel: the canvas can't
        out_h, out_w = tf.minimum(out_h, max_size), tf.minimum(out_w, max_size)
    return tf.cast(tf.maximum(tf.stack([out_h, out_w], axis=-1), 1.0), tf.int32)


class Geometry(NamedTuple):
    """Draws of the augmentation (leading axes `[...]`): flip, first resize, crop, final size."""

    flip: tf.Tensor  # bool [...]
    resize: tf.Tensor  # int32 [..., 2] (h, w) of the first resize
    crop: tf.Tensor  # int32 [..., 4] (top, left, h, w) in the resized image
    final: tf.Tensor  # int32 [..., 2] (h, w) of the output image


def _choice(options: tuple[int, ...], uniform: tf.Tensor) -> tf.Tensor:
    """random.choice(options) from U(0,1) draws `[N]`."""
    index = tf.minimum(tf.cast(uniform * len(options), tf.int32), len(options) - 1)
    return tf.gather(tf.constant(options, tf.int32), index)


def _randint(low: tf.Tensor, high: tf.Tensor, uniform: tf.Tensor) -> tf.Tensor:
    """random.randint(low, high), both ends included, from U(0,1) draws `[N]`."""
    span = tf.cast(tf.maximum(high - low, 0) + 1, tf.float32)
    return low + tf.minimum(tf.cast(uniform * span, tf.int32), tf.cast(span, tf.int32) - 1)


def draw_geometries(
    height: tf.Tensor, width: tf.Tensor, sizes: ScaledSizes, uniforms: tf.Tensor, crop: tf.Tensor
) -> Geometry:
    """Returns N draws of the official flip / resize / crop-and-resize from U(0,1) `[N, 7]`;
    bool `crop` `[N]` picks the branch of each (RandomSelect)."""
    u = tf.unstack(uniforms, axis=1)
    count = tf.shape(uniforms)[:1]
    height, width = tf.fill(count, height), tf.fill(count, width)
    flip = u[0] < 0.5
    final_scale = _choice(sizes.scales, u[1])
    resize_only = resized_shape(height, width, final_scale, sizes.max_size)
    first = resized_shape(height, width, _choice(sizes.crop_resizes, u[2]), None)
    first_h, first_w = first[:, 0], first[:, 1]
    crop_w = _randint(sizes.crop_min, tf.minimum(first_w, sizes.crop_max), u[3])
    crop_h = _randint(sizes.crop_min, tf.minimum(first_h, sizes.crop_max), u[4])
    # Images smaller than the smallest crop (only on tiny canvases): the whole image.
    crop_w, crop_h = tf.minimum(crop_w, first_w), tf.minimum(crop_h, first_h)
    top = _randint(0, first_h - crop_h, u[5])
    left = _randint(0, first_w - crop_w, u[6])
    window = tf.stack([top, left, crop_h, crop_w], axis=1)
    whole = tf.concat([tf.zeros_like(resize_only), resize_only], axis=1)
    final = resized_shape(crop_h, crop_w, final_scale, sizes.max_size)
    pick = crop[:, None]
    return Geometry(
        flip,
        tf.where(pick, first, resize_only),
        tf.where(pick, window, whole),
        tf.where(pick, final, resize_only),
    )


def transform_boxes(
    boxes: tf.Tensor, height: tf.Tensor, width: tf.Tensor, geometry: Geometry
) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns xyxy boxes `[..., k, 4]` in output pixels and bool `[..., k]` non-empty after the
    crop, for boxes `[k, 4]` in input pixels and geometries with leading axes `[...]`."""
    w0, h0 = tf.cast(width, tf.float32), tf.cast(height, tf.float32)
    x0, y0, x1, y1 = tf.unstack(boxes, axis=-1)
    flip = geometry.flip[..., None]
    x0, x1 = tf.where(flip, w0 - x1, x0), tf.where(flip, w0 - x0, x1)
    resize = tf.cast(geometry.resize, tf.float32)[..., None, :]
    sx, sy = resize[..., 1] / w0, resize[..., 0] / h0
    top, left, crop_h, crop_w = tf.unstack(
        tf.cast(geometry.crop, tf.float32)[..., None, :], axis=-1
    )
    x0 = tf.clip_by_value(x0 * sx - left, 0.0, crop_w)
    x1 = tf.clip_by_value(x1 * sx - left, 0.0, crop_w)
    y0 = tf.clip_by_value(y0 * sy - top, 0.0, crop_h)
    y1 = tf.clip_by_value(y1 * sy - top, 0.0, crop_h)
    keep = (x1 > x0) & (y1 > y0)
    final = tf.cast(geometry.final, tf.float32)[..., None, :]
    fx, fy = final[..., 1] / crop_w, final[..., 0] / crop_h
    return tf.stack([x0 * fx, y0 * fy, x1 * fx, y1 * fy], axis=-1), keep


def apply_to_image(image: tf.Tensor, geometry: Geometry) -> tf.Tensor:
    """Returns float32 `[h, w, 3]` in [0, 1]: uint8 `[H, W, 3]` flipped, resized, cropped, resized."""
    image = tf.cond(geometry.flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    # Bilinear with antialiasing, like PIL's bilinear resize in torchvision's F.resize.
    image = tf.image.resize(tf.cast(image, tf.float32), geometry.resize, antialias=True)
    top, left, crop_h, crop_w = tf.unstack(geometry.crop)
    image = image[top : top + crop_h, left : left + crop_w]
    image = tf.image.resize(image, geometry.final, antialias=True)
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


def detreg_view(
    image: tf.Tensor,
    region_boxes: tf.Tensor,
    region_box_index: tf.Tensor,
    region_levels: tf.Tensor,
    num_regions: int,
    canvas: int,
    seed: tf.Tensor,
) -> dict[str, tf.Tensor]:
    """Returns one DETReg sample on an S x S canvas (S = `canvas`), k = `num_regions`:

    `view1` float32 `[S, S, 3]` in [0, 1] (image top-left, zeros elsewhere), `pad_mask` bool
    `[S, S]` (True on image pixels), `region_boxes` float32 `[k, 4]` cxcywh normalised by the
    unpadded image, `region_valid` bool `[k]` (valid boxes first, in rank order).
    """
    rank_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    boxes, valid = top_regions(
        region_boxes, region_box_index, region_levels, num_regions, rank_seed
    )
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    sizes = scaled_sizes(canvas)
    # MAX_ATTEMPTS draws (flip, branch, sizes, crop), then the fallback: the first draw's flip and
    # scale without the crop.
    uniforms = tf.random.stateless_uniform([MAX_ATTEMPTS, 8], augment_seed)
    uniforms = tf.concat([uniforms, uniforms[:1]], axis=0)
    take_crop = tf.concat([uniforms[:MAX_ATTEMPTS, 7] >= 0.5, [False]], axis=0)
    geometries = draw_geometries(height, width, sizes, uniforms[:, :7], take_crop)
    kept = transform_boxes(boxes, height, width, geometries)[1] & valid
    good = tf.reduce_sum(tf.cast(kept, tf.int32), axis=1)[:MAX_ATTEMPTS] >= MIN_BOXES
    chosen = tf.where(
        tf.reduce_any(good), tf.argmax(tf.cast(good, tf.int32), output_type=tf.int32), MAX_ATTEMPTS
    )
    geometry = Geometry(*(tf.gather(part, chosen) for part in geometries))

    view = apply_to_image(image, geometry)
    out_boxes, keep = transform_boxes(boxes, height, width, geometry)
    keep &= valid
    order = tf.argsort(tf.cast(~keep, tf.int32), stable=True)  # kept boxes first, rank order kept
    out_boxes, keep = tf.gather(out_boxes, order), tf.gather(keep, order)
    final_h, final_w = tf.unstack(tf.cast(geometry.final, tf.float32))
    x0, y0, x1, y1 = tf.unstack(out_boxes, axis=1)
    cxcywh = tf.stack(
        [
            (x0 + x1) / 2 / final_w,
            (y0 + y1) / 2 / final_h,
            (x1 - x0) / final_w,
            (y1 - y0) / final_h,
        ],
        axis=1,
    )
    cxcywh = tf.where(keep[:, None], cxcywh, 0.0)
    rows = tf.range(canvas)[:, None] < geometry.final[0]
    cols = tf.range(canvas)[None, :] < geometry.final[1]
    padded = tf.image.pad_to_bounding_box(view, 0, 0, canvas, canvas)
    padded.set_shape([canvas, canvas, 3])
    cxcywh.set_shape([num_regions, 4])
    keep.set_shape([num_regions])
    return {
        "view1": padded,
        "pad_mask": rows & cols,
        "region_boxes": cxcywh,
        "region_valid": keep,
    }
