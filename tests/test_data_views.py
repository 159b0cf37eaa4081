"""Joint crop/flip of image and FH mask: the mask stays on the image content it describes."""

import numpy as np
import pytest
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


def _crop_windows(height: int, width: int, num: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Returns offsets and sizes [num, 2] of random_crop_window(**kwargs) over seeds (i, 7)."""

    @tf.function
    def windows(seeds):
        def one(seed):
            window = views.random_crop_window(tf.constant([height, width, 3]), seed, **kwargs)
            return tf.concat(window, 0)

        return tf.map_fn(one, seeds, fn_output_signature=tf.int32)

    seeds = tf.stack([tf.range(num, dtype=tf.int64), tf.fill([num], tf.constant(7, tf.int64))], 1)
    out = windows(seeds).numpy()
    return out[:, :2], out[:, 2:]


def _released_crop_areas(height: int, width: int, num: int) -> np.ndarray:
    """Area fractions of the released formula, sampled in NumPy (round half to even, as tf)."""
    rng = np.random.default_rng(0)
    area = rng.uniform(0.08, 1.0, num) * height * width
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), num))
    w = np.minimum(np.round(np.sqrt(area * ratio)), width)
    h = np.minimum(np.round(np.sqrt(area / ratio)), height)
    return w * h / (height * width)


def test_crop_area_distribution_follows_the_released_formula():
    height, width, num = 375, 500, 2400
    offsets, sizes = _crop_windows(height, width, num)
    assert (offsets >= 0).all() and (offsets + sizes <= [height, width]).all()
    areas = sizes.prod(axis=1) / (height * width)
    reference = _released_crop_areas(height, width, 400_000)
    quantiles = np.linspace(0.05, 0.95, 19)
    # Standard error of a quantile of 2,400 draws is ~0.01 here.
    np.testing.assert_allclose(
        np.quantile(areas, quantiles), np.quantile(reference, quantiles), atol=0.035
    )
    np.testing.assert_allclose(areas.mean(), reference.mean(), atol=0.015)
    assert 0.50 < reference.mean() < 0.53  # the figure quoted in random_crop_window

    unclamped = (sizes[:, 0] < height) & (sizes[:, 1] < width)
    aspects = sizes[unclamped, 1] / sizes[unclamped, 0]
    assert aspects.min() >= 0.74 and aspects.max() <= 1.35  # 3/4..4/3 up to integer rounding
    # Offsets are uniform over the valid positions: scaled to [0, 1], mean 1/2 and variance 1/12.
    for axis, side in enumerate((height, width)):
        room = side - sizes[:, axis]
        movable = room >= 20
        scaled = (offsets[movable, axis] + 0.5) / (room[movable] + 1)
        np.testing.assert_allclose(scaled.mean(), 0.5, atol=0.03)
        np.testing.assert_allclose(scaled.var(), 1 / 12, atol=0.01)


def test_crop_window_of_a_tiny_image_stays_inside_it():
    offsets, sizes = _crop_windows(2, 3, 64)
    assert (sizes >= 1).all() and (offsets >= 0).all() and (offsets + sizes <= [2, 3]).all()


def test_crop_min_area_raises_the_smallest_crop():
    areas = []
    for seed in range(100):
        _, size = views.random_crop_window(
            tf.constant([120, 160, 3]), tf.constant([seed, 0], tf.int64), area_range=(0.2, 1.0)
        )
        areas.append(size.numpy().prod() / (120 * 160))
    assert 0.19 <= min(areas) < 0.35 and max(areas) <= 1.0  # MoCo v2's 0.2-1, and used


def _torchvision_crops(height: int, width: int, num: int, scale: tuple) -> np.ndarray:
    """Sizes [num, 2] (h, w) from a NumPy transcription of RandomResizedCrop.get_params."""
    rng = np.random.default_rng(1)
    log_ratio = (np.log(3 / 4), np.log(4 / 3))
    sizes = []
    for _ in range(num):
        for _ in range(10):
            target = height * width * rng.uniform(*scale)
            ratio = np.exp(rng.uniform(*log_ratio))
            w, h = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                sizes.append((h, w))
                break
        else:  # the fallback: whole image at the nearest allowed aspect ratio
            if width / height < 3 / 4:
                sizes.append((int(round(width / (3 / 4))), width))
            elif width / height > 4 / 3:
                sizes.append((height, int(round(height * 4 / 3))))
            else:
                sizes.append((height, width))
    return np.array(sizes, np.float64)


def _distorted_bbox_crops(height: int, width: int, num: int) -> np.ndarray:
    """Sizes [num, 2] from a NumPy transcription of TensorFlow's sample_distorted_bounding_box
    (GenerateRandomCrop, then the coverage test) with SimCLR's arguments."""
    rng = np.random.default_rng(2)
    min_area, max_area = 0.08 * height * width, 1.0 * height * width
    sizes = []
    for _ in range(num):
        crop = (height, width)  # no attempt succeeded: the whole image
        for _ in range(100):
            aspect = rng.uniform(3 / 4, 4 / 3)
            h = int(np.rint(np.sqrt(min_area / aspect)))
            max_h = int(np.rint(np.sqrt(max_area / aspect)))
            if np.rint(max_h * aspect) > width:
                max_h = int(np.floor((width + 0.5 - 1e-7) / aspect))
                if np.rint(max_h * aspect) > width:
                    max_h -= 1
            max_h = min(max_h, height)
            h = min(h, max_h)
            if h < max_h:
                h += rng.integers(0, max_h - h + 1)
            w = int(np.rint(h * aspect))
            area = w * h
            if area < min_area:
                h += 1
                w = int(np.rint(h * aspect))
                area = w * h
            if area > max_area:
                h -= 1
                w = int(np.rint(h * aspect))
                area = w * h
            if area < min_area or area > max_area or w > width or h > height or w <= 0 or h <= 0:
                continue
            if area >= 10 and area / (height * width) >= 0.1:  # kMinArea, min_object_covered
                crop = (h, w)
                break
        sizes.append(crop)
    return np.array(sizes, np.float64)


@pytest.mark.parametrize(
    "sampler, scale, height, width",
    [
        ("torchvision", (0.2, 1.0), 375, 500),
        ("torchvision", (0.08, 1.0), 120, 400),  # wide: the centre-crop fallback is used
        ("tf_distorted_bbox", (0.08, 1.0), 375, 500),
    ],
)
def test_crop_sampler_area_and_aspect_quantiles_match_the_official_algorithm(
    sampler, scale, height, width
):
    num = 2000
    offsets, sizes = _crop_windows(height, width, num, area_range=scale, sampler=sampler)
    assert (offsets >= 0).all() and (offsets + sizes <= [height, width]).all()
    if sampler == "torchvision":
        reference = _torchvision_crops(height, width, 20_000, scale)
    else:
        reference = _distorted_bbox_crops(height, width, 20_000)
    quantiles = np.linspace(0.05, 0.95, 19)
    areas, reference_areas = (x.prod(axis=1) / (height * width) for x in (sizes, reference))
    # Standard error of a quantile of 2,000 draws is ~0.01 here.
    np.testing.assert_allclose(
        np.quantile(areas, quantiles), np.quantile(reference_areas, quantiles), atol=0.035
    )
    aspects, reference_aspects = (x[:, 1] / x[:, 0] for x in (sizes, reference))
    np.testing.assert_allclose(
        np.quantile(aspects, quantiles), np.quantile(reference_aspects, quantiles), atol=0.035
    )


def test_torchvision_sampler_falls_back_to_the_centre_crop():
    # A 10 x 200 strip: no draw of area >= 50% fits 10 rows at aspect <= 4/3, so every window is
    # the fallback: full height, width round(10 * 4/3) = 13, centred.
    offsets, sizes = _crop_windows(10, 200, 16, area_range=(0.5, 1.0), sampler="torchvision")
    np.testing.assert_array_equal(sizes, np.tile([10, 13], (16, 1)))
    np.testing.assert_array_equal(offsets, np.tile([0, (200 - 13) // 2], (16, 1)))


def test_crop_sampler_and_area_range_errors_name_the_config_field():
    with pytest.raises(ValueError, match="crop_sampler='pil'"):
        views.random_crop_window(tf.constant([8, 8, 3]), tf.constant([0, 0]), sampler="pil")
    with pytest.raises(ValueError, match="crop_min_area"):
        views.random_crop_window(tf.constant([8, 8, 3]), tf.constant([0, 0]), area_range=(0, 1))


def test_torchvision_sampler_resizes_bilinear():
    assert views.resize_method("torchvision") == "bilinear"
    assert views.resize_method("released") == views.resize_method("tf_distorted_bbox") == "bicubic"
    image = np.zeros((32, 32, 3), np.uint8)
    image[:, 16:] = 255
    bilinear = views.crop_flip_resize_image(
        image, tf.constant([0, 0]), tf.constant([32, 32]), tf.constant(False), 8, "bilinear"
    ).numpy()
    # Antialiased bilinear (a triangle filter 4 px wide at 4x downsampling) never overshoots,
    # unlike bicubic's ringing; clipped bicubic would give exact 0 and 1 away from the edge.
    assert bilinear.min() >= 0.0 and 0.0 < bilinear[0, 3, 0] < 0.5 < bilinear[0, 4, 0] < 1.0


def test_centre_view_crops_the_centre_of_the_resized_image():
    image = np.zeros((40, 80, 3), np.uint8)
    image[:, 36:44] = 255  # a white stripe through the centre
    view = views.centre_view(image, 16).numpy()
    assert view.shape == (16, 16, 3) and view.min() >= 0.0 and view.max() <= 1.0
    column_brightness = view.mean(axis=(0, 2))
    assert column_brightness[7:9].min() > 0.9 and column_brightness[:3].max() < 0.05


def _first_appearance_ranks(mask: np.ndarray) -> np.ndarray:
    """NumPy reference: each id replaced by the rank of its first raster appearance."""
    values, first = np.unique(mask, return_index=True)
    rank_of = {v: r for r, v in enumerate(values[np.argsort(first)])}
    return np.vectorize(rank_of.get)(mask)


def test_reindex_keeps_the_partition_and_numbers_by_first_appearance():
    rng = np.random.default_rng(3)
    mask = rng.choice(np.arange(5000, 5000 + 4000, 13), size=(20, 24)).astype(np.int32)
    ids, folded = views.reindex_segments(tf.constant(mask), 512)
    ids = ids.numpy()
    assert int(folded) == 0 and np.unique(mask).size < 512
    np.testing.assert_array_equal(ids, _first_appearance_ranks(mask))


def test_reindex_folds_segments_beyond_max_mask_id_into_the_last_id():
    mask = (np.arange(20 * 20).reshape(20, 20) * 7 + 300).astype(np.int32)  # 400 segments
    ids, folded = views.reindex_segments(tf.constant(mask), 256)
    ids, ranks = ids.numpy(), _first_appearance_ranks(mask)
    assert int(folded) == 400 - 256
    np.testing.assert_array_equal(ids, np.minimum(ranks, 255))
    assert (ids == 255).sum() == 400 - 255  # the last kept segment plus the 144 folded ones


def test_reindex_leaves_negative_ids_unassigned():
    mask = np.array([[-1, 40, 40], [7, -1, 900]], np.int32)
    ids, folded = views.reindex_segments(tf.constant(mask), 2)
    np.testing.assert_array_equal(ids.numpy(), [[-1, 0, 0], [1, -1, 1]])
    assert int(folded) == 1
