"""Grid masks, mask-id sampling and mask pooling against hand-built cases and NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detcon.ops import masks

# Jitted entry points (grid shape and sizes static): faster on CPU than op-by-op dispatch.
_binary_masks = jax.jit(masks.binary_masks, static_argnums=(1, 2))
_binary_masks_dense = jax.jit(masks.binary_masks_dense, static_argnums=(1, 2))
_sample = jax.jit(masks.sample_mask_ids, static_argnums=2)


def _grid_masks_loop(ids: np.ndarray, grid_shape: tuple[int, int], max_mask_id: int) -> np.ndarray:
    """Independent reference: explicit loops over images and cells with per-cell bincount."""
    batch, height, width = ids.shape
    grid_h, grid_w = grid_shape
    cell_h, cell_w = height // grid_h, width // grid_w
    out = np.zeros((batch, max_mask_id, grid_h * grid_w), np.float32)
    for b in range(batch):
        for i in range(grid_h):
            for j in range(grid_w):
                block = ids[b, i * cell_h : (i + 1) * cell_h, j * cell_w : (j + 1) * cell_w].ravel()
                block = block[(block >= 0) & (block < max_mask_id)]
                if block.size == 0:
                    continue
                counts = np.bincount(block, minlength=max_mask_id)
                best = counts.max()
                winner = min(k for k in range(max_mask_id) if counts[k] == best)
                out[b, winner, i * grid_w + j] = 1.0
    return out


def test_binary_masks_hand_built_majority_ties_and_ignored_ids():
    # 4x4 ids, grid 2x2 -> 2x2-pixel cells; max_mask_id 4, so -1 and 5 do not vote.
    ids = np.array([[[1, 1, 2, 2], [1, 3, 0, 0], [-1, -1, 3, -1], [5, -1, -1, 2]]], np.int32)
    # cell 0: {1,1,1,3} -> 1; cell 1: {2,2,0,0} tie -> 0; cell 2: nothing valid -> none;
    # cell 3: {3,2} tie (valid pixels outnumbered by ignored ones) -> 2.
    expected = np.zeros((1, 4, 4), np.float32)
    expected[0, 1, 0] = 1.0
    expected[0, 0, 1] = 1.0
    expected[0, 2, 3] = 1.0
    for fn in (_binary_masks, _binary_masks_dense):
        got = fn(jnp.asarray(ids), (2, 2), 4)
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_binary_masks_cells_are_row_major():
    # Image of 2x3 cells, each a 1x1-pixel cell holding id = its row-major index.
    ids = np.arange(6, dtype=np.int32).reshape(1, 2, 3)
    got = np.asarray(_binary_masks(jnp.asarray(ids), (2, 3), 8))
    np.testing.assert_array_equal(got[0, :6], np.eye(6, dtype=np.float32))
    assert not got[0, 6:].any()


def test_binary_masks_matches_dense_and_loop_on_random_ids():
    rng = np.random.default_rng(0)
    # Few distinct ids per cell make ties frequent; -2..-1 and >= 8 exercise the ignore rule.
    ids = rng.integers(-2, 11, size=(3, 12, 18)).astype(np.int32)
    fast = np.asarray(_binary_masks(jnp.asarray(ids), (3, 6), 8))
    dense = np.asarray(_binary_masks_dense(jnp.asarray(ids), (3, 6), 8))
    expected = _grid_masks_loop(ids, (3, 6), 8)
    assert fast.shape == (3, 8, 18)
    np.testing.assert_array_equal(fast, expected)
    np.testing.assert_array_equal(dense, expected)
    # Each cell has at most one owner.
    assert fast.sum(axis=1).max() == 1.0


@pytest.mark.parametrize("fn", [masks.binary_masks, masks.binary_masks_dense])
def test_binary_masks_rejects_indivisible_grid(fn):
    with pytest.raises(ValueError, match="evenly divide"):
        fn(jnp.zeros((1, 10, 12), jnp.int32), (3, 4))


def _masks_with_ids(present: list[list[int]], num_ids: int, num_cells: int) -> jnp.ndarray:
    """[B, num_ids, num_cells] grid masks where image b covers its cells with ids present[b]."""
    out = np.zeros((len(present), num_ids, num_cells), np.float32)
    for b, ids in enumerate(present):
        for cell in range(num_cells):
            if ids:
                out[b, ids[cell % len(ids)], cell] = 1.0
    return jnp.asarray(out)


def test_sample_mask_ids_only_present_ids_roughly_uniform():
    num_keys, num_samples = 64, 64
    grid = _masks_with_ids([[1, 4, 6, 9]] * num_keys, num_ids=12, num_cells=9)
    keys = jax.random.split(jax.random.key(0), num_keys)
    ids = np.asarray(_sample(keys, grid, num_samples))
    assert ids.shape == (num_keys, num_samples) and ids.dtype == np.int32
    values, counts = np.unique(ids, return_counts=True)
    np.testing.assert_array_equal(values, [1, 4, 6, 9])
    # 4096 draws: each frequency has std ~0.007 around 0.25.
    np.testing.assert_allclose(counts / ids.size, 0.25, atol=0.04)
    # Different keys give different draws.
    assert len({tuple(row) for row in ids}) > num_keys // 2


def test_sample_mask_ids_single_and_empty_images_with_raw_keys():
    grid = _masks_with_ids([[3], [], [0, 2]], num_ids=5, num_cells=4)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)  # raw uint32 [3, 2]
    assert keys.dtype == jnp.uint32 and keys.shape == (3, 2)
    ids = np.asarray(_sample(keys, grid, 16))
    np.testing.assert_array_equal(ids[0], np.full(16, 3))
    np.testing.assert_array_equal(ids[1], np.full(16, masks.NO_MASK_ID))
    assert set(ids[2]) <= {0, 2}


def test_sample_mask_ids_is_invariant_to_batch_split():
    rng = np.random.default_rng(2)
    grid = jnp.asarray((rng.random((8, 10, 6)) < 0.3).astype(np.float32))
    keys = jax.random.split(jax.random.key(3), 8)
    whole = np.asarray(_sample(keys, grid, 16))
    halves = np.concatenate(
        [np.asarray(_sample(keys[:4], grid[:4], 16)), np.asarray(_sample(keys[4:], grid[4:], 16))]
    )
    np.testing.assert_array_equal(whole, halves)
    present = np.asarray(grid).sum(-1) > 0
    for b in range(8):
        assert present[b][whole[b]].all()


def test_sample_mask_ids_needs_one_key_per_image():
    with pytest.raises(ValueError, match="one key per image"):
        masks.sample_mask_ids(jax.random.split(jax.random.key(0), 2), jnp.ones((3, 4, 5)), 2)


def test_mask_pool_matches_numpy_loop():
    rng = np.random.default_rng(4)
    batch, num_cells, channels, num_ids = 2, 6, 3, 5
    features = rng.normal(size=(batch, num_cells, channels)).astype(np.float32)
    grid = (rng.random((batch, num_ids, num_cells)) < 0.5).astype(np.float32)
    grid[1, 2] = 0.0  # an id without cells pools to zeros
    mask_ids = np.array([[0, 3, 3, 4], [2, 1, masks.NO_MASK_ID, 0]], np.int32)
    got = np.asarray(jax.jit(masks.mask_pool)(features, grid, mask_ids))
    expected = np.zeros((batch, mask_ids.shape[1], channels), np.float32)
    for b in range(batch):
        for r, k in enumerate(mask_ids[b]):
            if k < 0:
                continue
            cells = [g for g in range(num_cells) if grid[b, k, g] > 0]
            for g in cells:
                expected[b, r] += features[b, g]
            if cells:
                expected[b, r] /= len(cells)
    assert got.shape == (batch, 4, channels)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[1, 0], 0.0)
    np.testing.assert_array_equal(got[1, 2], 0.0)


def test_sample_mask_ids_program_size_does_not_grow_with_batch():
    def num_equations(batch: int) -> int:
        keys = jax.random.split(jax.random.key(0), batch)
        jaxpr = jax.make_jaxpr(masks.sample_mask_ids, static_argnums=2)(
            keys, jnp.ones((batch, 8, 4)), 16
        )
        return len(jaxpr.jaxpr.eqns)

    assert num_equations(2) == num_equations(64)
