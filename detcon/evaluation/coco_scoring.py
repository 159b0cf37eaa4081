"""Boxes scored against COCO-style ground truth with pycocotools: detections in the results
format, AP / AP50 / AR, the class-agnostic view, and the boxes a detector is compared with
(random boxes, selective-search region priors).

Results are COCO's: {"image_id", "category_id", "bbox": [x, y, w, h] in the image's own pixels,
"score"}. Class-agnostic scoring gives every ground-truth object and every box category 1.
"""

import contextlib
import copy
import io
from typing import Sequence

import numpy as np

from detcon.data.build import region_priors

AGNOSTIC_CATEGORY = 1


def _quiet_coco(dataset: dict):
    """A pycocotools COCO index of `dataset` (its progress prints swallowed)."""
    from pycocotools import coco

    api = coco.COCO()
    api.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api


def class_agnostic(dataset: dict) -> dict:
    """The ground truth with every annotation in one category, AGNOSTIC_CATEGORY ('object')."""
    agnostic = copy.deepcopy(dataset)
    for annotation in agnostic["annotations"]:
        annotation["category_id"] = AGNOSTIC_CATEGORY
    agnostic["categories"] = [{"id": AGNOSTIC_CATEGORY, "name": "object", "supercategory": ""}]
    return agnostic


def results(
    image_ids: Sequence[int],
    boxes: Sequence[np.ndarray],
    scores: Sequence[np.ndarray],
    categories: Sequence[np.ndarray],
) -> list[dict]:
    """COCO results of per-image xyxy pixel boxes [k, 4], scores [k] and category ids [k]."""
    out = []
    for image_id, xyxy, score, category in zip(image_ids, boxes, scores, categories):
        xyxy = np.asarray(xyxy, np.float64).reshape(-1, 4)
        for (x0, y0, x1, y1), s, c in zip(xyxy, np.asarray(score), np.asarray(category)):
            out.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(c),
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "score": float(s),
                }
            )
    return out


def normalised_to_pixels(boxes: np.ndarray, height: float, width: float) -> np.ndarray:
    """cxcywh boxes normalised by the image [..., 4] -> xyxy in its pixels [..., 4]."""
    cx, cy, w, h = np.moveaxis(np.asarray(boxes, np.float64), -1, 0)
    scaled = [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width]
    return np.stack(scaled + [(cy + h / 2) * height], axis=-1)


def score(ground_truth: dict, detections: list[dict], max_dets: int = 100) -> dict[str, float]:
    """COCOeval (bbox) of `detections` against `ground_truth`: AP (IoU .50:.95), AP50 and AR
    at `max_dets` boxes per image (all areas); 0 for no detections."""
    from pycocotools import cocoeval

    if not detections:  # loadRes cannot read an empty list
        return {"AP": 0.0, "AP50": 0.0, f"AR@{max_dets}": 0.0}
    gt = _quiet_coco(ground_truth)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(detections))
        evaluator = cocoeval.COCOeval(gt, dt, "bbox")
        evaluator.params.maxDets = [1, 10, max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # stats: 0 AP, 1 AP50, 8 AR at maxDets[2]; -1 (no ground truth at all) reads as 0.
    stats = np.maximum(evaluator.stats, 0.0)
    return {"AP": float(stats[0]), "AP50": float(stats[1]), f"AR@{max_dets}": float(stats[8])}


def random_boxes(
    rng: np.random.Generator, height: float, width: float, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """`count` boxes with uniform corners in the image (xyxy pixels [count, 4]) and random
    scores [count]."""
    xs = np.sort(rng.uniform(0.0, width, (count, 2)), axis=1)
    ys = np.sort(rng.uniform(0.0, height, (count, 2)), axis=1)
    return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1), rng.random(count)


def ranked_priors(
    priors: region_priors.RegionPriors, rng: np.random.Generator, top_k: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """An image's selective-search boxes in one pipeline draw of their ranks (xyxy pixels
    [k, 4], the first top_k, or all when 0) and scores [k] falling with the rank (1 first)."""
    boxes = region_priors.top_regions(priors, top_k or len(priors.boxes), rng)
    return boxes, 1.0 - np.arange(len(boxes)) / max(len(boxes), 1)
