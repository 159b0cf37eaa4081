"""Felzenszwalb-Huttenlocher id maps -> grid masks, mask sampling and mask pooling.

All functions are pure `jnp` code with static shapes, so they jit, vmap and pmap.
Id conventions: an id map holds one integer object id per pixel; ids outside
`[0, max_mask_id)` (e.g. -1 padding) are ignored everywhere. Sampled mask ids use -1 for
"no object" (an image whose grid holds no valid id), which pools to a zero feature and is
ignored by `detcon.ops.losses.detcon_b_loss`.
"""

import jax
import jax.numpy as jnp

# Sampled id for an image whose grid holds no valid id; see `sample_mask_ids`.
NO_MASK_ID = -1


def _cell_size(masks: jax.Array, grid_shape: tuple[int, int]) -> tuple[int, int]:
    """Pixel size (cell_h, cell_w) of one grid cell; raises unless the grid divides the image."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be integer ids [B, H, W], got shape {masks.shape}.")
    _, height, width = masks.shape
    grid_h, grid_w = grid_shape
    if grid_h <= 0 or grid_w <= 0 or height % grid_h or width % grid_w:
        raise ValueError(
            f"grid_shape {tuple(grid_shape)} must evenly divide the mask size {(height, width)}."
        )
    return height // grid_h, width // grid_w


def _one_hot_winners(counts: jax.Array, max_mask_id: int) -> jax.Array:
    """Per-cell id counts [N, M] -> float one-hot of the majority id [N, M] (zero row if none)."""
    # argmax returns the first maximum, so ties go to the lowest id.
    winner = jnp.argmax(counts, axis=-1)
    has_any = jnp.max(counts, axis=-1) > 0
    one_hot = (jnp.arange(max_mask_id)[None, :] == winner[:, None]) & has_any[:, None]
    return one_hot.astype(jnp.float32)


def binary_masks(
    masks: jax.Array, grid_shape: tuple[int, int], max_mask_id: int = 256
) -> jax.Array:
    """Majority-vote grid masks: ids [B, H, W] -> float32 one-hot [B, max_mask_id, grid_h*grid_w].

    Each cell (an H/grid_h x W/grid_w pixel block, cells in row-major order) belongs to the id
    covering most of its pixels; ties go to the lowest id. Ids outside [0, max_mask_id) do not
    vote; a cell with no valid pixel belongs to no id (all-zero column).
    """
    cell_h, cell_w = _cell_size(masks, grid_shape)
    batch = masks.shape[0]
    grid_h, grid_w = grid_shape
    num_cells = batch * grid_h * grid_w
    ids = masks.astype(jnp.int32)
    valid = (ids >= 0) & (ids < max_mask_id)
    # Flat index of (cell, id) per pixel, computed from iotas so the id map is never
    # transposed or expanded to a per-pixel one-hot: the scatter-add below touches each pixel
    # once and the only large buffer is the [B*G, M] count table.
    row = jax.lax.broadcasted_iota(jnp.int32, ids.shape, 1) // cell_h
    col = jax.lax.broadcasted_iota(jnp.int32, ids.shape, 2) // cell_w
    image = jax.lax.broadcasted_iota(jnp.int32, ids.shape, 0)
    cell = (image * grid_h + row) * grid_w + col
    # Invalid pixels point one past the table and are dropped by the scatter.
    flat = jnp.where(valid, cell * max_mask_id + ids, num_cells * max_mask_id)
    counts = jnp.zeros((num_cells * max_mask_id,), jnp.int32)
    counts = counts.at[flat.reshape(-1)].add(1, mode="drop").reshape(num_cells, max_mask_id)
    one_hot = _one_hot_winners(counts, max_mask_id)
    return one_hot.reshape(batch, grid_h * grid_w, max_mask_id).transpose(0, 2, 1)


def binary_masks_dense(
    masks: jax.Array, grid_shape: tuple[int, int], max_mask_id: int = 256
) -> jax.Array:
    """Reference for `binary_masks` (same contract, [B, H, W] -> [B, M, G]) via a per-pixel one-hot.

    Straightforward and memory-hungry (a [B, H, W, M] float buffer): kept only as the
    independent reference for tests and the speed/memory benchmark.
    """
    cell_h, cell_w = _cell_size(masks, grid_shape)
    batch, height, width = masks.shape
    grid_h, grid_w = grid_shape
    # jax.nn.one_hot yields an all-zero row for ids outside [0, M), i.e. they do not vote.
    pixels = jax.nn.one_hot(masks, max_mask_id, dtype=jnp.float32)
    area = pixels.reshape(batch, grid_h, cell_h, grid_w, cell_w, max_mask_id).mean(axis=(2, 4))
    one_hot = _one_hot_winners(area.reshape(batch * grid_h * grid_w, max_mask_id), max_mask_id)
    return one_hot.reshape(batch, grid_h * grid_w, max_mask_id).transpose(0, 2, 1)


def _sample_one(key: jax.Array, mask: jax.Array, num_samples: int) -> jax.Array:
    """Ids [num_samples] drawn uniformly with replacement among ids present in mask [M, G]."""
    present = jnp.sum(mask, axis=-1) > 0
    num_present = jnp.sum(present.astype(jnp.int32))
    # Draw a rank k among the present ids, then map it to the id whose inclusive running count
    # of present ids first exceeds k. Much cheaper to compile than a categorical over all M.
    uniform = jax.random.uniform(key, (num_samples,))
    rank = jnp.floor(uniform * num_present.astype(jnp.float32)).astype(jnp.int32)
    rank = jnp.minimum(rank, num_present - 1)  # guards u * n rounding up to n
    running_count = jnp.cumsum(present.astype(jnp.int32))
    ids = jnp.sum(running_count[None, :] <= rank[:, None], axis=-1).astype(jnp.int32)
    return jnp.where(num_present > 0, ids, NO_MASK_ID)


def sample_mask_ids(keys: jax.Array, masks: jax.Array, num_samples: int = 16) -> jax.Array:
    """Per-image ids [B, num_samples] (int32) sampled uniformly with replacement from present ids.

    keys: one PRNG key per image, either typed keys [B] (`jax.random.key`) or raw uint32
    keys [B, 2] (`jax.random.PRNGKey` + `jax.random.split`, default threefry impl).
    masks: [B, M, G] from `binary_masks`. Each image draws only with its own key, so the
    result for an image does not depend on which batch or device it is sampled with.
    An image with no id on its grid gets `NO_MASK_ID` (-1) for every sample: `mask_pool`
    gives it a zero feature and `detcon_b_loss` gives such rois no loss and no role as
    negatives (without this, both views would agree on a fake id and form a spurious
    positive pair).
    """
    if keys.shape[0] != masks.shape[0]:
        raise ValueError(f"need one key per image: keys {keys.shape}, masks {masks.shape}.")
    return jax.vmap(_sample_one, in_axes=(0, 0, None))(keys, masks, num_samples)


def mask_pool(features: jax.Array, masks: jax.Array, mask_ids: jax.Array) -> jax.Array:
    """Mean feature over each sampled mask's cells: [B, G, C], [B, M, G], ids [B, R] -> [B, R, C].

    An id outside [0, M) (e.g. `NO_MASK_ID`) or a mask without cells pools to zeros.
    """
    num_ids = masks.shape[1]
    valid = (mask_ids >= 0) & (mask_ids < num_ids)
    safe_ids = jnp.where(valid, mask_ids, 0)
    selected = jnp.take_along_axis(masks, safe_ids[:, :, None], axis=1)  # [B, R, G]
    selected = selected * valid[:, :, None].astype(selected.dtype)
    area = jnp.maximum(jnp.sum(selected, axis=-1, keepdims=True), 1.0)
    summed = jnp.einsum("brg,bgc->brc", selected.astype(features.dtype), features)
    return summed / area.astype(features.dtype)
