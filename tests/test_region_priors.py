"""Region priors: selective search on hand-built images with known regions, and the rank draw."""

import numpy as np
import pytest

from detcon.data.build import region_priors as rp

# Three flat rectangles (x0, y0, x1, y1; x1, y1 exclusive) on a flat background, at 128 px so
# selective search's 128 x 128 resize is the identity.
_RECTS = ((10, 12, 40, 50), (70, 20, 110, 44), (30, 80, 90, 118))
_COLOURS = ((230, 40, 40), (40, 220, 60), (250, 240, 30))


def _rectangles(size: int = rp.SS_SIZE) -> np.ndarray:
    image = np.empty((size, size, 3), np.uint8)
    image[:] = (40, 60, 200)
    for (x0, y0, x1, y1), colour in zip(_RECTS, _COLOURS):
        image[y0:y1, x0:x1] = colour
    return image


def _cv2():
    return pytest.importorskip(
        "cv2", reason="opencv-contrib-python-headless (optional, see setup.sh) is not installed"
    )


def test_every_rectangle_and_the_whole_image_are_regions():
    priors = rp.selective_search(_rectangles())
    boxes = {tuple(b) for b in priors.boxes.astype(int).tolist()}
    for rect in _RECTS:
        assert rect in boxes
    assert (0, 0, 128, 128) in boxes
    # Every other box is a ring FH cut out of a blurred edge: within 4 px of a rectangle.
    for box in boxes - set(_RECTS) - {(0, 0, 128, 128)}:
        assert min(np.abs(np.subtract(box, r)).max() for r in _RECTS) <= 4, box
    assert priors.box_index.shape == priors.levels.shape and priors.levels.min() == 1
    np.testing.assert_array_equal(np.unique(priors.box_index), np.arange(len(priors.boxes)))


def test_boxes_are_scaled_to_the_original_image():
    # The same picture at 256 x 384: boxes come back in its pixels (OpenCV rect / 128 * size).
    wide = np.repeat(np.repeat(_rectangles(), 2, axis=0), 3, axis=1)
    boxes = {tuple(b) for b in rp.selective_search(wide).boxes.tolist()}
    for x0, y0, x1, y1 in _RECTS:
        assert (3.0 * x0, 2.0 * y0, 3.0 * x1, 2.0 * y1) in boxes


def test_grouping_levels_and_boxes_on_known_segments():
    # Background 0 with three separate rectangles: each merge involves the background's region.
    labels = np.zeros((128, 128), np.int64)
    for index, (x0, y0, x1, y1) in enumerate(_RECTS, start=1):
        labels[y0:y1, x0:x1] = index
    image = _rectangles()
    texture = rp.histograms(rp.texture_bins(image), labels, 4, rp.TEXTURE_BINS)
    colour = rp.histograms(rp.colour_bins(image), labels, 4, rp.COLOUR_BINS)
    boxes, levels = rp.hierarchical_grouping(labels, colour, texture, rp.adjacency(labels, 4))
    assert levels.tolist() == [1, 1, 1, 1, 2, 3, 4]
    assert [tuple(b) for b in boxes[1:4].tolist()] == list(_RECTS)
    assert all(tuple(b) == (0, 0, 128, 128) for b in boxes[[0, 4, 5, 6]].tolist())


def test_grouping_merges_the_most_similar_neighbours_first():
    # Two touching rectangles of one colour inside a background: colour, texture and size all
    # prefer joining them (fill is 1 for both candidate pairs), so they merge first.
    image = np.empty((128, 128, 3), np.uint8)
    image[:] = (20, 20, 20)
    image[30:60, 20:50] = image[30:60, 50:90] = (200, 120, 40)
    labels = np.zeros((128, 128), np.int64)
    labels[30:60, 20:50], labels[30:60, 50:90] = 1, 2
    texture = rp.histograms(rp.texture_bins(image), labels, 3, rp.TEXTURE_BINS)
    colour = rp.histograms(rp.colour_bins(image), labels, 3, rp.COLOUR_BINS)
    boxes, levels = rp.hierarchical_grouping(labels, colour, texture, rp.adjacency(labels, 3))
    assert levels.tolist() == [1, 1, 1, 2, 3]
    assert tuple(boxes[3]) == (20, 30, 90, 60) and tuple(boxes[4]) == (0, 0, 128, 128)


def test_adjacency_is_opencvs_three_neighbour_scan():
    labels = np.array([[0, 1, 1], [2, 3, 1], [2, 2, 4]])
    got = rp.adjacency(labels, 5)
    # Pixel (i, j), i, j >= 1, links to (i, j-1), (i-1, j), (i-1, j-1): never up-right, so the
    # 3 at (1, 1) and the 1 at (0, 2) link only through (1, 2) = 1 -> (0, 1), (1, 1), (0, 2).
    pairs = {(a, b) for a, b in zip(*np.nonzero(np.triu(got)))}
    assert pairs == {(0, 3), (1, 3), (2, 3), (2, 4), (1, 4), (3, 4)}


def test_top_regions_repeat_per_seed_and_rank_a_box_by_its_best_region():
    priors = rp.selective_search(_rectangles())
    first = rp.top_regions(priors, 30, np.random.default_rng(5))
    np.testing.assert_array_equal(first, rp.top_regions(priors, 30, np.random.default_rng(5)))
    assert not np.array_equal(first, rp.top_regions(priors, 30, np.random.default_rng(6)))
    assert len(first) == min(30, len(priors.boxes))
    assert len({tuple(b) for b in first.tolist()}) == len(first)  # duplicates dropped
    # Box 0 has two level-1 regions, box 1 one: OpenCV keeps a rect's first occurrence, so box 0
    # comes first with probability P(min(u1, u2) < u3) = 2/3.
    two = rp.RegionPriors(np.eye(2, 4, dtype=np.float32), np.array([0, 0, 1]), np.ones(3, int))
    rng = np.random.default_rng(0)
    wins = np.mean([rp.top_regions(two, 1, rng)[0, 0] == 1 for _ in range(6000)])
    assert abs(wins - 2 / 3) < 0.03


def test_box_iou_and_matched_fraction_by_hand():
    a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    b = np.array([[5, 0, 15, 10]])
    np.testing.assert_allclose(rp.box_iou(a, b), [[50 / 150], [0.0]])
    assert rp.matched_fraction(a, a) == 1.0 and rp.matched_fraction(a, b, 0.3) == 0.5


def test_colour_conversions_and_resize_match_opencv():
    cv2 = _cv2()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    for code, ours in ((cv2.COLOR_BGR2HSV, rp.opencv_hsv), (cv2.COLOR_BGR2Lab, rp.opencv_lab)):
        diff = np.abs(cv2.cvtColor(pixels, code).astype(int) - ours(pixels).astype(int))
        # OpenCV's fixed-point tables round differently by a level or two now and then.
        assert diff.max() <= 2 and diff.mean() < 0.1
    resized = cv2.resize(pixels, (128, 128)).astype(int)
    assert np.abs(resized - rp.resize_linear(pixels, 128, 128)).max() <= 1


def test_opencv_regions_are_among_ours_on_the_rectangles():
    cv2 = _cv2()
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(_rectangles())
    search.switchToSelectiveSearchFast()
    rects = search.process()
    theirs = {(x, y, x + w, y + h) for x, y, w, h in rects.tolist()}
    ours = {tuple(b) for b in rp.selective_search(_rectangles()).boxes.astype(int).tolist()}
    assert theirs <= ours, theirs - ours
