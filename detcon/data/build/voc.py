"""PASCAL VOC segmentation layout: the colour palette, palette PNG label maps, image-set lists.

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png      palette ('P') PNG, pixel value = class, 255 = ignore
    <root>/ImageSets/Segmentation/<split>.txt   one id per line

This is the layout MMSegmentation's `PascalVOCDataset` and torchvision's `VOCSegmentation` read.
"""

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

IGNORE_INDEX = 255


def palette(num_colours: int = 256) -> np.ndarray:
    """Returns uint8 `[num_colours, 3]`: the VOC colour of every label value (bit-interleaved)."""
    labels = np.arange(num_colours)
    colours = np.zeros((num_colours, 3), np.int64)
    # Bit j of channel c at position 7 - k comes from bit 3k + c of the label, as in the VOC devkit.
    for k in range(8):
        for channel in range(3):
            bit = (labels >> (3 * k + channel)) & 1
            colours[:, channel] |= bit << (7 - k)
    return colours.astype(np.uint8)


def write_label_png(path: str, labels: np.ndarray) -> None:
    """Writes uint8 `[H, W]` class values as a VOC palette PNG at `path`."""
    if labels.dtype != np.uint8 or labels.ndim != 2:
        raise ValueError(f"{path}: labels must be uint8 [H, W], got {labels.dtype} {labels.shape}")
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    image.putpalette(palette().tobytes())
    image.save(path, format="PNG")


def read_label_png(path: str) -> np.ndarray:
    """Returns the uint8 `[H, W]` class values of a palette PNG (the indices, not the colours)."""
    with Image.open(path) as image:
        if image.mode != "P":
            raise ValueError(
                f"{path}: expected a palette ('P') PNG of class values, got {image.mode}"
            )
        return np.asarray(image).copy()


def layout_paths(root: str) -> dict[str, str]:
    """Returns the folders of a VOC segmentation set: `images`, `labels`, `image_sets`."""
    return {
        "images": os.path.join(root, "JPEGImages"),
        "labels": os.path.join(root, "SegmentationClass"),
        "image_sets": os.path.join(root, "ImageSets", "Segmentation"),
    }


def write_image_set(root: str, split: str, ids: Sequence[str]) -> None:
    """Writes `ImageSets/Segmentation/<split>.txt`, one id per line."""
    path = os.path.join(layout_paths(root)["image_sets"], f"{split}.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(f"{i}\n" for i in ids)


def read_image_set(root: str, split: str) -> list[str]:
    """Returns the ids listed in `ImageSets/Segmentation/<split>.txt`."""
    path = os.path.join(layout_paths(root)["image_sets"], f"{split}.txt")
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]
