"""Joint crop/flip of image and FH mask: the mask stays on the image content it describes."""

import numpy as np
import tensorflow as tf
from scipy import ndimage

from detcon.data import views

_BLOCK = (24, 24)
_GRID = (4, 5)


def _regions_image() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (uint8 [96, 120, 3] image whose colour encodes its block, block ids, palette)."""
    rng = np.random.default_rng(1)
    num = _GRID[0] * _GRID[1]
    # Colours far apart, so a slightly blurred interior pixel still maps back to its own block.
    levels = [20, 120, 230]
    cube = np.array(np.meshgrid(levels, levels, levels), np.uint8).reshape(3, -1).T  # 27 colours
    palette = rng.permutation(cube)[:num]
    ids = np.arange(num).reshape(_GRID).repeat(_BLOCK[0], axis=0).repeat(_BLOCK[1], axis=1)
    return palette[ids], ids.astype(np.int32), palette


def _ids_from_colours(view: np.ndarray, palette: np.ndarray) -> np.ndarray:
    distances = np.linalg.norm(
        view[..., None, :] * 255.0 - palette[None, None].astype(np.float32), axis=-1
    )
    return distances.argmin(-1)


def test_unscaled_crop_and_flip_keep_mask_exactly_on_content():
    image, ids, palette = _regions_image()
    view, mask = views.crop_flip_resize(
        image, ids, tf.constant([7, 9]), tf.constant([32, 32]), tf.constant(True), image_size=32
    )
    expected = ids[7:39, 9:41][:, ::-1]
    np.testing.assert_array_equal(mask.numpy(), expected)
    np.testing.assert_array_equal(_ids_from_colours(view.numpy(), palette), expected)
    np.testing.assert_allclose(view.numpy() * 255.0, image[7:39, 9:41][:, ::-1], atol=1e-3)


def test_random_views_keep_mask_aligned_with_content_away_from_boundaries():
    image, ids, palette = _regions_image()
    flips = set()
    for seed in range(24):
        view, mask = views.random_view(image, ids, 64, tf.constant([seed, 5], tf.int64))
        mask = mask.numpy()
        assert mask.shape == (64, 64) and mask.dtype == np.int32
        # Only pixels at least 3 pixels from any mask boundary: bicubic blurs colours across edges.
        interior = ndimage.minimum_filter(mask, size=7) == ndimage.maximum_filter(mask, size=7)
        from_colour = _ids_from_colours(view.numpy(), palette)
        assert interior.mean() > 0.25
        np.testing.assert_array_equal(from_colour[interior], mask[interior])
        # Block ids increase left to right, so a flipped view has decreasing ids along a row.
        row = mask[32]
        if row[0] != row[-1]:
            flips.add(bool(row[0] > row[-1]))
    assert flips == {True, False}


def test_crop_windows_respect_area_and_aspect_ranges():
    areas, aspects = [], []
    for seed in range(200):
        offset, size = views.random_crop_window(
            tf.constant([120, 160, 3]), tf.constant([seed, 0], tf.int64)
        )
        offset, size = offset.numpy(), size.numpy()
        assert (offset >= 0).all() and (offset + size <= [120, 160]).all()
        areas.append(size.prod() / (120 * 160))
        aspects.append(size[1] / size[0])
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() >= 0.07 and areas.max() <= 1.0
    assert aspects.min() >= 0.7 and aspects.max() <= 1.4  # 3/4..4/3 up to integer rounding
    assert areas.min() < 0.3 and areas.max() > 0.7  # the range is actually used


def test_crop_min_area_raises_the_smallest_crop():
    areas = []
    for seed in range(100):
        _, size = views.random_crop_window(
            tf.constant([120, 160, 3]), tf.constant([seed, 0], tf.int64), min_area=0.2
        )
        areas.append(size.numpy().prod() / (120 * 160))
    assert 0.19 <= min(areas) < 0.35 and max(areas) <= 1.0  # MoCo v2's 0.2-1, and used


def test_centre_view_crops_the_centre_of_the_resized_image():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 36:44] = 255  # a white stripe through the centre
    view = views.centre_view(image, 16).numpy()
    assert view.shape == (16, 16, 3) and view.min() >= 0.0 and view.max() <= 1.0
    column_brightness = view.mean(axis=(0, 2))
    assert column_brightness[7:9].min() > 0.9 and column_brightness[:3].max() < 0.05
