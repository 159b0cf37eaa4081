"""PASCAL VOC segmentation layout reader (also what the scenes generator writes).

  root/JPEGImages/<id>.jpg
  root/SegmentationClass/<id>.png     palette ('P') or index ('L') PNG: class index per pixel,
                                      255 = ignore (VOC's object boundaries)
  root/ImageSets/Segmentation/{train,val}.txt   one <id> per line

Every image is resized (aspect kept) so its longer side is `image_size`, then padded at the bottom
and right to `image_size` x `image_size`; padded label pixels are 255, so they count nowhere.
"""

import os

import numpy as np
from PIL import Image

from detcon.evaluation.segmentation import IGNORE_LABEL

SPLIT_FILE = os.path.join("ImageSets", "Segmentation", "{split}.txt")


def split_ids(root: str, split: str) -> list[str]:
    """The image ids listed in ImageSets/Segmentation/<split>.txt."""
    path = os.path.join(root, SPLIT_FILE.format(split=split))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: --dataset_directory must be a PASCAL VOC-style root with "
            "JPEGImages/, SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt."
        )
    with open(path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise ValueError(f"{path} lists no images.")
    return ids


def read_label(path: str) -> np.ndarray:
    """Class indices [H, W] uint8 of a palette or greyscale PNG (palette PNGs store indices)."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(
                f"{path}: mode {image.mode!r}; segmentation labels must be palette "
                "('P') or index ('L') PNGs holding class indices, not RGB colours."
            )
        return np.array(image, dtype=np.uint8)


def resize_and_pad(
    image: np.ndarray, label: np.ndarray, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Image [H, W, 3] (bilinear) and label [H, W] (nearest) fitted into [S, S], padding = 255."""
    height, width = label.shape
    scale = image_size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    resized_label = np.asarray(Image.fromarray(label).resize((new_w, new_h), Image.NEAREST))
    out_image = np.zeros((image_size, image_size, 3), np.uint8)
    out_label = np.full((image_size, image_size), IGNORE_LABEL, np.uint8)
    out_image[:new_h, :new_w] = resized
    out_label[:new_h, :new_w] = resized_label
    return out_image, out_label


def fitting_image_size(root: str, split: str = "train") -> int:
    """The smallest multiple of 32 that holds the longer side of every image of `split` (reads
    headers only): 512 for PASCAL VOC 2012's 500 px images, 64 for the 64 px scenes."""
    longest = 0
    for image_id in split_ids(root, split):
        path = os.path.join(root, "JPEGImages", image_id + ".jpg")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is listed in {split}.txt but missing.")
        with Image.open(path) as image:
            longest = max(longest, *image.size)
    return max(32, -(-longest // 32) * 32)


def load_split(root: str, split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, S, S, 3], labels uint8 [N, S, S]) of one split, resized and padded."""
    if image_size % 32:
        raise ValueError(f"--seg_image_size={image_size} must be a multiple of 32 (the stride).")
    images, labels = [], []
    for image_id in split_ids(root, split):
        image_path = os.path.join(root, "JPEGImages", image_id + ".jpg")
        label_path = os.path.join(root, "SegmentationClass", image_id + ".png")
        for path in (image_path, label_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is listed in {split}.txt but missing.")
        with Image.open(image_path) as image:
            pixels = np.asarray(image.convert("RGB"))
        label = read_label(label_path)
        if label.shape != pixels.shape[:2]:
            raise ValueError(
                f"{label_path}: label {label.shape} and image {pixels.shape[:2]} differ in size."
            )
        image, label = resize_and_pad(pixels, label, image_size)
        images.append(image)
        labels.append(label)
    return np.stack(images), np.stack(labels)


def subsample_labels(labels: np.ndarray, label_size: int) -> np.ndarray:
    """Labels [N, S, S] -> [N, L, L] by taking every (S / L)-th pixel (nearest neighbour).

    For images enlarged by an integer factor (small images fed to a stride-32 torso at a larger
    size), L = the original side gives back the original labels exactly.
    """
    size = labels.shape[-1]
    if label_size <= 0 or size % label_size:
        raise ValueError(f"--seg_label_size={label_size} must divide --seg_image_size={size}.")
    stride = size // label_size
    return labels[:, ::stride, ::stride]


def num_classes(*label_sets: np.ndarray) -> int:
    """1 + the largest class index (255 excluded) over the label arrays."""
    largest = max(int(np.max(np.where(x == IGNORE_LABEL, 0, x))) for x in label_sets)
    return largest + 1
