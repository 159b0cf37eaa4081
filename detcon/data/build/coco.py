"""COCO-style instance annotations (the `instances_*.json` layout pycocotools reads) from label maps.

    {"images": [{"id", "file_name", "height", "width"}],
     "annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h], "area",
                      "iscrowd": 0, "segmentation": {"size": [h, w], "counts": [...]}}],
     "categories": [{"id", "name", "supercategory"}]}

Boxes are the pixel-edge boxes of each instance's visible pixels (x, y its top-left corner, w, h
whole pixels), area its pixel count, segmentation its mask as uncompressed RLE (column-major run
lengths starting with a run of zeros, as pycocotools encodes them).
"""

from collections.abc import Sequence

import numpy as np


def rle(mask: np.ndarray) -> dict:
    """Returns the uncompressed COCO RLE of bool `[H, W]`: {"size": [H, W], "counts": [...]}."""
    flat = np.asarray(mask, bool).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    edges = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts  # COCO counts start with the zeros
    return {"size": list(mask.shape), "counts": counts}


def instance_annotations(instance_map: np.ndarray, categories: Sequence[int]) -> list[dict]:
    """Returns one annotation (no ids yet) per instance i = 1..len(categories) with pixels in
    uint8 `[H, W]` `instance_map`; `categories[i - 1]` is instance i's category id."""
    annotations = []
    for instance, category in enumerate(categories, start=1):
        mask = instance_map == instance
        if not mask.any():
            continue  # painted over entirely, or outside the frame: nothing to detect
        rows, cols = np.nonzero(mask)
        x, y = int(cols.min()), int(rows.min())
        width, height = int(cols.max()) + 1 - x, int(rows.max()) + 1 - y
        annotations.append(
            {
                "category_id": int(category),
                "bbox": [x, y, width, height],
                "area": int(mask.sum()),
                "iscrowd": 0,
                "segmentation": rle(mask),
            }
        )
    return annotations


def dataset(
    images: Sequence[tuple[str, np.ndarray, Sequence[int]]], class_names: Sequence[str]
) -> dict:
    """Returns the COCO dict of `images`: (file name, instance map `[H, W]`, categories of its
    instances); image ids count from 1 in order, category k (1..K) is `class_names[k - 1]`."""
    entries, annotations = [], []
    for image_id, (file_name, instance_map, categories) in enumerate(images, start=1):
        height, width = instance_map.shape
        entries.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for annotation in instance_annotations(instance_map, categories):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    categories = [
        {"id": k, "name": name, "supercategory": "shape"}
        for k, name in enumerate(class_names, start=1)
    ]
    return {"images": entries, "annotations": annotations, "categories": categories}
