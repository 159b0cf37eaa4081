"""OpenCV's selective search as DETReg calls it, and how closely `region_priors` reproduces it.

Needs the optional `opencv-contrib-python-headless` (setup.sh installs it where the index has it).
"""

import time
from collections.abc import Sequence

import numpy as np

from detcon.data.build import region_priors


def opencv_boxes(rgb: np.ndarray, size: int = region_priors.SS_SIZE) -> np.ndarray:
    """Returns float32 `[N, 4]` xyxy boxes of one OpenCV call, in rank order (DETReg's
    `selective_search`: the RGB array resized to size x size, handed over as if BGR)."""
    import cv2  # optional

    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(cv2.resize(rgb, (size, size)))
    search.switchToSelectiveSearchFast()
    rects = search.process().astype(np.float32)
    height, width = rgb.shape[:2]
    boxes = rects / size * np.array([width, height, width, height], np.float32)
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def compare(
    photos: Sequence[tuple[str, np.ndarray]], draws: int = 10, k: int = region_priors.TOP_K
) -> dict:
    """Returns per-photo and mean box recall (IoU >= 0.5) between OpenCV's and our top-k.

    `ours_recall_of_opencv`: fraction of OpenCV's top-k matched by one of ours (one draw each),
    `opencv_recall_of_ours` the reverse; `opencv_vs_opencv` and `ours_vs_ours` compare two
    independent draws of one implementation (the ceiling the rank randomness leaves);
    `all_*` compare every distinct box of each (no ranks).
    """
    rng = np.random.default_rng(0)
    rows = {}
    for name, rgb in photos:
        start = time.perf_counter()
        priors = region_priors.selective_search(rgb)
        ours_seconds = time.perf_counter() - start
        start = time.perf_counter()
        everything = opencv_boxes(rgb)
        opencv_seconds = time.perf_counter() - start
        scores = []
        for _ in range(draws):
            theirs, theirs_again = opencv_boxes(rgb)[:k], opencv_boxes(rgb)[:k]
            ours = region_priors.top_regions(priors, k, rng)
            ours_again = region_priors.top_regions(priors, k, rng)
            scores.append(
                [
                    region_priors.matched_fraction(theirs, ours),
                    region_priors.matched_fraction(ours, theirs),
                    region_priors.matched_fraction(theirs, theirs_again),
                    region_priors.matched_fraction(ours, ours_again),
                ]
            )
        mean = np.mean(scores, axis=0)
        rows[name] = {
            "ours_recall_of_opencv": float(mean[0]),
            "opencv_recall_of_ours": float(mean[1]),
            "opencv_vs_opencv": float(mean[2]),
            "ours_vs_ours": float(mean[3]),
            "all_ours_recall_of_opencv": region_priors.matched_fraction(everything, priors.boxes),
            "all_opencv_recall_of_ours": region_priors.matched_fraction(priors.boxes, everything),
            "distinct_boxes_ours": len(priors.boxes),
            "distinct_boxes_opencv": len(everything),
            "seconds_ours": ours_seconds,
            "seconds_opencv": opencv_seconds,
        }
    keys = next(iter(rows.values())).keys()
    means = {key: float(np.mean([row[key] for row in rows.values()])) for key in keys}
    return {"photos": rows, "mean": means, "draws": draws, "k": k}
