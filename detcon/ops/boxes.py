"""Box conversions and (generalised) IoU, as DETR's util/box_ops.py defines them; pure jnp."""

import jax
import jax.numpy as jnp
import jax.scipy.ndimage


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """(centre x, centre y, width, height) -> (x0, y0, x1, y1): [..., 4] -> [..., 4]."""
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
    """(x0, y0, x1, y1) -> (centre x, centre y, width, height): [..., 4] -> [..., 4]."""
    x0, y0, x1, y1 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes: jax.Array) -> jax.Array:
    """Areas of xyxy boxes: [..., 4] -> [...]."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pairwise IoU and union of xyxy boxes: a [N, 4], b [M, 4] -> ([N, M], [N, M])."""
    area_a, area_b = box_area(a), box_area(b)
    lt = jnp.maximum(a[:, None, :2], b[None, :, :2])
    rb = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = jnp.clip(rb - lt, 0.0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union, union


def generalized_box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of xyxy boxes: [N, 4], [M, 4] -> [N, M].

    Degenerate boxes (x1 < x0) give wrong values, as in DETR (which asserts against them); the
    callers pass sigmoid-predicted and data boxes of positive size.
    """
    iou, union = box_iou(a, b)
    lt = jnp.minimum(a[:, None, :2], b[None, :, :2])
    rb = jnp.maximum(a[:, None, 2:], b[None, :, 2:])
    wh = jnp.clip(rb - lt, 0.0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def crop_and_resize(image: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
    """Bilinear crops of xyxy pixel boxes resized to size x size: image [H, W, C], boxes [k, 4]
    -> [k, size, size, C]. Samples sit at the output pixel centres (align_corners=False); boxes
    under one pixel are widened to one; samples outside the image repeat its edge."""
    centres = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size

    def one(box: jax.Array) -> jax.Array:
        x0, y0, x1, y1 = box
        x1, y1 = jnp.maximum(x1, x0 + 1.0), jnp.maximum(y1, y0 + 1.0)
        ys = y0 + centres * (y1 - y0) - 0.5  # pixel i's centre is at i + 0.5
        xs = x0 + centres * (x1 - x0) - 0.5
        grid = jnp.meshgrid(ys, xs, indexing="ij")
        channel = lambda c: jax.scipy.ndimage.map_coordinates(c, grid, order=1, mode="nearest")
        return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)

    return jax.vmap(one)(boxes)
