"""Region priors: OpenCV's fast selective search, as DETReg runs it, in NumPy and scikit-image.

DETReg's "top-30" boxes (`datasets/selfdet.py:120-137` of amirbar/DETReg) come from
`cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()` with
`switchToSelectiveSearchFast()` (opencv_contrib `modules/ximgproc/src/
selectivesearchsegmentation.cpp`) on the RGB image resized to 128 x 128 (aspect ignored):

- bases: the image in HSV and in Lab (8-bit OpenCV encodings), each segmented by Felzenszwalb-
  Huttenlocher graph segmentation with k in {150, 300, 450}, sigma 0.8, min size 100: 6 maps;
- strategies: colour+fill+texture+size and fill+texture+size (equal weights), so 12 hierarchical
  groupings, each merging the most similar pair of neighbouring regions until one is left;
- every region (segment: level 1; merge: max(children's levels) + 1) gets rank U(0,1) x level;
  all regions sorted by rank, duplicate rects dropped, the first 30 kept.

Everything but the rank draw is deterministic, so `selective_search` runs once per image (when
records are written) and returns every region's box and level; drawing the ranks per sample
(`top_regions`, and the tf.data pipeline) then reproduces a fresh OpenCV call each epoch exactly.
Boxes repeat across groupings (every segment appears once per strategy), so they are stored once
with each region pointing at its box; a box's rank is the smallest of its regions' ranks, which
is the one OpenCV's "first occurrence wins" keeps.

The FH segmentation is scikit-image's `felzenszwalb`. Its parameters map to OpenCV's
`createGraphSegmentation(sigma, k, min_size)` one to one: `scale` = k (scikit-image divides it by
255 because it works on [0, 1] images, which is OpenCV's k on 0..255 values), `sigma` = sigma (the
Gaussian pre-blur), `min_size` = min_size (the same post-pass merging smaller segments along sorted
edges). It differs in the graph: 8-connected pixels (OpenCV: 4), a strict `<` merge test
(OpenCV: `<=`), a truncate-4 Gaussian with half-sample reflection (OpenCV: 7 taps, reflect-101).
Like DETReg, the RGB array is handed over where OpenCV expects BGR, so the colour spaces are those
of the image with red and blue swapped.
"""

import heapq
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from skimage import color
from skimage.segmentation import felzenszwalb

SS_SIZE = 128  # DETReg's res_size: the image is resized to 128 x 128 before selective search
FH_KS = (150, 300, 450)  # switchToSelectiveSearchFast(base_k=150, inc_k=150): k, k + 150, k + 300
FH_SIGMA = 0.8
FH_MIN_SIZE = 100  # createGraphSegmentation's default, which the fast mode keeps
COLOUR_BINS = 25  # per channel, over [0, 256)
TEXTURE_BINS = 10  # per gradient map, over [0, 256)
TOP_K = 30  # DETReg's max_prop


class RegionPriors(NamedTuple):
    """Every selective-search region of one image, boxes stored once."""

    boxes: np.ndarray  # float32 [U, 4] distinct boxes, xyxy in pixels of the original image
    box_index: np.ndarray  # int32 [R] the box of each region (index into `boxes`)
    levels: np.ndarray  # int32 [R] each region's hierarchy level (1 = an FH segment)


def resize_linear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Returns uint8 `[height, width, C]`: cv2.resize INTER_LINEAR of uint8 `[H, W, C]`."""

    def taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Half-pixel centres, no antialiasing; OpenCV clamps positions outside the image.
        position = (np.arange(target) + 0.5) * (source / target) - 0.5
        low = np.floor(position).astype(np.int64)
        weight = position - low
        weight[low < 0] = 0.0
        low = np.maximum(low, 0)
        over = low >= source - 1
        weight[over] = 0.0
        low[over] = source - 1
        return low, np.minimum(low + 1, source - 1), weight

    pixels = image.astype(np.float64)
    top, bottom, wy = taps(image.shape[0], height)
    left, right, wx = taps(image.shape[1], width)
    rows = pixels[top] * (1 - wy)[:, None, None] + pixels[bottom] * wy[:, None, None]
    out = rows[:, left] * (1 - wx)[None, :, None] + rows[:, right] * wx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def opencv_hsv(bgr: np.ndarray) -> np.ndarray:
    """Returns uint8 `[H, W, 3]`: cv2.cvtColor(COLOR_BGR2HSV) of uint8 BGR (H in [0, 180))."""
    b, g, r = (bgr[..., i].astype(np.float64) for i in range(3))
    value = np.maximum(np.maximum(r, g), b)
    diff = value - np.minimum(np.minimum(r, g), b)
    saturation = np.where(value > 0, 255.0 * diff / np.maximum(value, 1), 0.0)
    safe = np.maximum(diff, 1)
    # OpenCV's order of precedence: V == R, then V == G, then B; hue in units of 2 degrees.
    hue = np.where(
        value == r,
        30.0 * (g - b) / safe,
        np.where(value == g, 60.0 + 30.0 * (b - r) / safe, 120.0 + 30.0 * (r - g) / safe),
    )
    hue = np.where(diff > 0, np.rint(hue), 0.0)
    hue = np.where(hue < 0, hue + 180.0, hue)
    return np.stack([hue, np.rint(saturation), value], axis=-1).clip(0, 255).astype(np.uint8)


def opencv_lab(bgr: np.ndarray) -> np.ndarray:
    """Returns uint8 `[H, W, 3]`: cv2.cvtColor(COLOR_BGR2Lab) of uint8 BGR (L*255/100, a+128, b+128)."""
    lab = color.rgb2lab(bgr[..., ::-1])  # sRGB gamma and D65, as OpenCV's 8-bit conversion
    scaled = np.stack([lab[..., 0] * 255.0 / 100.0, lab[..., 1] + 128.0, lab[..., 2] + 128.0], -1)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def segment(image: np.ndarray, k: float, sigma: float = FH_SIGMA, min_size: int = FH_MIN_SIZE):
    """Returns int64 `[H, W]` FH segment ids 0..n-1, numbered by first appearance in raster order."""
    labels = felzenszwalb(image, scale=k, sigma=sigma, min_size=min_size)
    values, first = np.unique(labels.ravel(), return_index=True)
    # OpenCV's finalMapping numbers segments as a raster scan meets them; ids only break ties.
    renumber = np.empty(values.max() + 1, np.int64)
    renumber[values[np.argsort(first)]] = np.arange(len(values))
    return renumber[labels]


def adjacency(labels: np.ndarray, num_segments: int) -> np.ndarray:
    """Returns bool `[n, n]` neighbouring segments, as OpenCV's `process` marks them.

    A pixel (i, j) with i, j >= 1 links to its left, upper and upper-left neighbours (no
    upper-right, nothing from row or column 0), as the C++ loop does.
    """
    here = labels[1:, 1:].ravel()
    result = np.zeros((num_segments, num_segments), bool)
    for other in (labels[1:, :-1], labels[:-1, 1:], labels[:-1, :-1]):
        result[here, other.ravel()] = True
    result |= result.T
    np.fill_diagonal(result, False)
    return result


def histograms(bins: np.ndarray, labels: np.ndarray, num_segments: int, num_bins: int):
    """Returns float64 `[n, maps * num_bins]`: per segment, the histograms of its pixels' bin
    indices `bins` `[maps, H, W]`, all maps together summing to 1 (OpenCV's normalisation)."""
    flat = labels.ravel()[None, :] * num_bins + bins.reshape(len(bins), -1)
    counts = [np.bincount(f, minlength=num_segments * num_bins) for f in flat]
    hist = np.concatenate([c.reshape(num_segments, num_bins) for c in counts], axis=1)
    hist = hist.astype(np.float64)
    return hist / hist.sum(axis=1, keepdims=True)


def colour_bins(image: np.ndarray) -> np.ndarray:
    """Returns int64 `[C, H, W]`: each pixel's 25-bin index per channel of uint8 `[H, W, C]`."""
    return np.moveaxis(image.astype(np.int64) * COLOUR_BINS // 256, -1, 0)


_SCHARR_X = np.array([[-3.0, 0.0, 3.0], [-10.0, 0.0, 10.0], [-3.0, 0.0, 3.0]])


def _scharr(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns the float32 Scharr x and y derivatives of `[H, W]` (OpenCV's reflect-101 border)."""
    plane = plane.astype(np.float32)
    return (
        ndimage.correlate(plane, _SCHARR_X, mode="mirror"),
        ndimage.correlate(plane, _SCHARR_X.T, mode="mirror"),
    )


def _centre(array: np.ndarray, height: int, width: int) -> np.ndarray:
    top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
    return array[top : top + height, left : left + width]


def gradient_maps(plane: np.ndarray) -> list[np.ndarray]:
    """Returns the 8 uint8 `[H, W]` gradient maps of one uint8 channel, as OpenCV's texture
    strategy makes them: Scharr x, y on the plane and on it rotated by 45 degrees (rotated back),
    each split into positive and negative parts, each stretched min..max to 0..255."""
    height, width = plane.shape
    # warpAffine of a uint8 plane: bilinear, zeros outside, rounded back to uint8.
    rotated = ndimage.rotate(plane.astype(np.float32), 45.0, reshape=True, order=1, cval=0.0)
    rotated = np.clip(np.rint(rotated), 0, 255)
    gradients = list(_scharr(plane))
    for derivative in _scharr(rotated):
        back = ndimage.rotate(derivative, -45.0, reshape=True, order=1, cval=0.0)
        gradients.append(_centre(back, height, width))
    maps = []
    for gradient in gradients:
        for part in (np.maximum(gradient, 0.0), np.minimum(gradient, 0.0)):
            low, high = float(part.min()), float(part.max())
            if high == low:  # OpenCV divides 0 by 0 here, and NaN saturates to 0
                maps.append(np.zeros_like(part, dtype=np.uint8))
                continue
            stretched = np.rint((part - low) * (255.0 / (high - low)))
            maps.append(np.clip(stretched, 0, 255).astype(np.uint8))
    return maps


def texture_bins(image: np.ndarray) -> np.ndarray:
    """Returns int64 `[C * 8, H, W]`: each pixel's 10-bin index in every gradient map."""
    maps = [m for c in range(image.shape[-1]) for m in gradient_maps(image[..., c])]
    return np.stack(maps).astype(np.int64) * TEXTURE_BINS // 256


def segment_boxes(labels: np.ndarray, num_segments: int) -> np.ndarray:
    """Returns int64 `[n, 4]`: each segment's pixel box x0, y0, x1, y1 (x1, y1 exclusive)."""
    rows, cols = np.indices(labels.shape)
    flat = labels.ravel()
    boxes = np.empty((num_segments, 4), np.int64)
    for column, values, reduce in (
        (0, cols, np.minimum),
        (1, rows, np.minimum),
        (2, cols + 1, np.maximum),
        (3, rows + 1, np.maximum),
    ):
        start = labels.size if reduce is np.minimum else -1
        out = np.full(num_segments, start, np.int64)
        reduce.at(out, flat, values.ravel())
        boxes[:, column] = out
    return boxes


def hierarchical_grouping(
    labels: np.ndarray,
    colour: np.ndarray | None,
    texture: np.ndarray,
    neighbours: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns every region's box int64 `[M, 4]` (x0, y0, x1, y1) and level int64 `[M]`.

    One grouping: start from the n segments (level 1), repeatedly merge the most similar pair of
    neighbours, the merge getting level max + 1 and its neighbours' similarities recomputed.
    Similarity = mean of colour (if `colour` `[n, B]` is given) and texture histogram
    intersections, size 1 - (s_a + s_b) / image and fill 1 - (box_ab - s_a - s_b) / image.
    """
    num_segments = texture.shape[0]
    capacity = 2 * num_segments - 1
    image_area = float(labels.size)
    sizes = np.zeros(capacity)
    sizes[:num_segments] = np.bincount(labels.ravel(), minlength=num_segments)
    boxes = np.zeros((capacity, 4), np.int64)
    boxes[:num_segments] = segment_boxes(labels, num_segments)
    levels = np.zeros(capacity, np.int64)
    levels[:num_segments] = 1
    histograms = [np.zeros((capacity, h.shape[1])) for h in (colour, texture) if h is not None]
    for target, source in zip(histograms, [h for h in (colour, texture) if h is not None]):
        target[:num_segments] = source
    terms = len(histograms) + 2

    def similarity(a: int, others: np.ndarray) -> np.ndarray:
        total = sum(np.minimum(h[a], h[others]).sum(axis=1) for h in histograms)
        both = sizes[a] + sizes[others]
        total = total + np.clip(1.0 - both / image_area, 0.0, 1.0)
        union = np.concatenate(
            [
                np.minimum(boxes[a, :2], boxes[others, :2]),
                np.maximum(boxes[a, 2:], boxes[others, 2:]),
            ],
            axis=1,
        )
        union_area = (union[:, 2] - union[:, 0]) * (union[:, 3] - union[:, 1])
        total = total + np.clip(1.0 - (union_area - both) / image_area, 0.0, 1.0)
        return total / terms

    links: list[set[int]] = [set(np.flatnonzero(row).tolist()) for row in neighbours]
    links += [set() for _ in range(capacity - num_segments)]
    heap: list[tuple[float, int, int, int]] = []
    pushes = 0
    for a in range(num_segments):
        later = np.array(sorted(b for b in links[a] if b > a), np.int64)
        if later.size:
            for b, value in zip(later.tolist(), similarity(a, later).tolist()):
                heap.append((-value, pushes, a, b))
                pushes += 1
    heapq.heapify(heap)
    alive = np.zeros(capacity, bool)
    alive[:num_segments] = True
    count = num_segments
    while heap:
        _, _, a, b = heapq.heappop(heap)
        if not (alive[a] and alive[b]):
            continue  # a pair whose region merged already: OpenCV erased it at that merge
        new = count
        count += 1
        total = sizes[a] + sizes[b]
        for h in histograms:  # size-weighted mean: the histogram of the union
            h[new] = (h[a] * sizes[a] + h[b] * sizes[b]) / total
        sizes[new] = total
        boxes[new, :2] = np.minimum(boxes[a, :2], boxes[b, :2])
        boxes[new, 2:] = np.maximum(boxes[a, 2:], boxes[b, 2:])
        levels[new] = max(levels[a], levels[b]) + 1
        alive[a] = alive[b] = False
        alive[new] = True
        around = sorted((links[a] | links[b]) - {a, b})
        links[new] = set(around)
        for m in around:
            links[m] -= {a, b}
            links[m].add(new)
        if around:
            others = np.array(around, np.int64)
            for m, value in zip(around, similarity(new, others).tolist()):
                heapq.heappush(heap, (-value, pushes, new, m))
                pushes += 1
    return boxes[:count], levels[:count]


def selective_search_regions(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns every region of the 12 groupings of uint8 `[h, w, 3]` (already at working size):
    boxes int64 `[R, 4]` (x0, y0, x1, y1 in its pixels, x1/y1 exclusive) and levels `[R]`."""
    all_boxes, all_levels = [], []
    for base in (opencv_hsv(image), opencv_lab(image)):  # RGB passed as BGR, as DETReg does
        base_colour, base_texture = colour_bins(base), texture_bins(base)
        for k in FH_KS:
            labels = segment(base, k)
            num_segments = int(labels.max()) + 1
            neighbours = adjacency(labels, num_segments)
            texture = histograms(base_texture, labels, num_segments, TEXTURE_BINS)
            colour = histograms(base_colour, labels, num_segments, COLOUR_BINS)
            for strategy_colour in (colour, None):  # colour+fill+texture+size, fill+texture+size
                boxes, levels = hierarchical_grouping(labels, strategy_colour, texture, neighbours)
                all_boxes.append(boxes)
                all_levels.append(levels)
    return np.concatenate(all_boxes), np.concatenate(all_levels)


def selective_search(rgb: np.ndarray) -> RegionPriors:
    """Returns the region priors of uint8 RGB `[H, W, 3]`: DETReg's fast selective search."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3] RGB pixels, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    small = resize_linear(rgb, SS_SIZE, SS_SIZE)
    rects, levels = selective_search_regions(small)
    distinct, box_index = np.unique(rects, axis=0, return_inverse=True)
    # DETReg: rect / 128 * (w, h), then x + width: pixel edges of the original image.
    scale = np.array([width, height, width, height], np.float64) / SS_SIZE
    return RegionPriors(
        boxes=(distinct * scale).astype(np.float32),
        box_index=box_index.reshape(-1).astype(np.int32),
        levels=levels.astype(np.int32),
    )


def box_ranks(priors: RegionPriors, uniforms: np.ndarray) -> np.ndarray:
    """Returns float64 `[U]`: each box's rank, the smallest U(0,1) x level of its regions `[R]`."""
    ranks = np.full(len(priors.boxes), np.inf)
    np.minimum.at(ranks, priors.box_index, uniforms * priors.levels)
    return ranks


def top_regions(priors: RegionPriors, k: int, rng: np.random.Generator) -> np.ndarray:
    """Returns float32 `[min(k, U), 4]`: one OpenCV-equivalent draw of the first k boxes."""
    ranks = box_ranks(priors, rng.random(len(priors.levels)))
    return priors.boxes[np.argsort(ranks, kind="stable")[:k]]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Returns float64 `[N, M]`: IoU of xyxy boxes a `[N, 4]` and b `[M, 4]`."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def matched_fraction(reference: np.ndarray, candidates: np.ndarray, threshold: float = 0.5):
    """Returns the fraction of `reference` boxes `[N, 4]` with a candidate at IoU >= threshold."""
    if len(reference) == 0:
        return float("nan")
    if len(candidates) == 0:
        return 0.0
    return float(np.mean(box_iou(reference, candidates).max(axis=1) >= threshold))
