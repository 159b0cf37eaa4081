r"""Writes a PNG grid: each image with its FH mask overlaid, then two augmented views and masks.

Segment boundaries are drawn in white on top of a colour per segment, so you can check by eye that
the masks follow the objects and that each view's mask is cropped and flipped with its image.

    python scripts/visualize_masks.py --output=/tmp/masks.png            # the demo dataset
    python scripts/visualize_masks.py --dataset_directory=imagenet-fh --num_images=8 --output=fh.png
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import tensorflow as tf
from absl import app, flags
from PIL import Image, ImageDraw

from detcon.data import pipeline
from detcon.data.build import demo

_DATASET_DIRECTORY = flags.DEFINE_string(
    "dataset_directory", None, "Shards to show; default: the demo dataset."
)
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", 6, "Rows in the grid (the first records of the split)."
)
_IMAGE_SIZE = flags.DEFINE_integer(
    "image_size", 160, "Size of each cell and of the augmented views."
)
_FH_MASK_INDEX = flags.DEFINE_integer("fh_mask_index", 0, "Which stored FH scale to show.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the augmented views.")
_OUTPUT = flags.DEFINE_string("output", "fh_masks.png", "PNG file to write.")

_HEADER = 18
_COLUMNS = ("image", "FH mask", "view 1", "view 1 mask", "view 2", "view 2 mask")


def segment_colours(mask: np.ndarray) -> np.ndarray:
    """Returns uint8 `[H, W, 3]`: a fixed pseudo-random colour per segment id of int `[H, W]`."""
    hashed = (mask.astype(np.uint64) * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(2**24)
    channels = [(hashed >> np.uint64(shift)) & np.uint64(255) for shift in (0, 8, 16)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Returns uint8 `[H, W, 3]`: image blended with segment colours, boundaries in white."""
    blended = 0.5 * image.astype(np.float32) + 0.5 * segment_colours(mask).astype(np.float32)
    boundary = np.zeros(mask.shape, bool)
    boundary[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    boundary[1:, :] |= mask[1:, :] != mask[:-1, :]
    blended[boundary] = 255.0
    outside = mask < 0  # letterbox around a scaled image: leave it as it is
    blended[outside] = image[outside]
    return blended.astype(np.uint8)


def _fit(pixels: np.ndarray, size: int, resample: Image.Resampling) -> np.ndarray:
    """Returns `[size, size, ...]`: pixels scaled to fit, letterboxed on black."""
    image = Image.fromarray(pixels)
    image.thumbnail((size, size), resample)
    cell = Image.new(image.mode, (size, size), -1 if image.mode == "I" else 0)  # -1: no segment
    cell.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return np.asarray(cell)


def grid_rows(
    dataset_directory: str, split: str, num_images: int, size: int, fh_mask_index: int, seed: int
) -> list[list[np.ndarray]]:
    """Returns, per record, six uint8 `[S, S, 3]` cells: image, mask, each view and its mask."""
    records = tf.data.TFRecordDataset(pipeline.list_shards(dataset_directory, split)).take(
        num_images
    )
    rows = []
    for index, record in enumerate(records):
        example = pipeline.decode_example(record)
        pair = pipeline.two_views(
            example, size, fh_mask_index, tf.constant([seed, index], tf.int64)
        )
        image = example["image"].numpy()
        mask = example["fh"][fh_mask_index].numpy()
        # The mask is scaled with nearest neighbour (via an id image) so ids stay ids.
        mask_cell = _fit(mask.astype(np.int32), size, Image.Resampling.NEAREST)
        row = [_fit(image, size, Image.Resampling.BILINEAR)]
        row.append(overlay(row[0], mask_cell))
        for view, view_mask in (("view1", "fh_mask1"), ("view2", "fh_mask2")):
            pixels = np.round(pair[view].numpy() * 255).astype(np.uint8)
            row += [pixels, overlay(pixels, pair[view_mask].numpy())]
        rows.append(row)
    if not rows:
        raise ValueError(f"no records in the {split!r} shards of {dataset_directory!r}")
    return rows


def compose(rows: list[list[np.ndarray]], size: int) -> Image.Image:
    """Returns the grid image with a header naming the columns."""
    gap = 4
    width = len(_COLUMNS) * (size + gap) + gap
    height = _HEADER + len(rows) * (size + gap) + gap
    canvas = Image.new("RGB", (width, height), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(_COLUMNS):
        draw.text((gap + column * (size + gap) + 4, 3), title, fill=(230, 230, 230))
    for row_index, row in enumerate(rows):
        for column, cell in enumerate(row):
            canvas.paste(
                Image.fromarray(cell),
                (gap + column * (size + gap), _HEADER + gap + row_index * (size + gap)),
            )
    return canvas


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    directory = _DATASET_DIRECTORY.value or demo.ensure_demo_dataset()
    rows = grid_rows(
        directory,
        _SPLIT.value,
        _NUM_IMAGES.value,
        _IMAGE_SIZE.value,
        _FH_MASK_INDEX.value,
        _SEED.value,
    )
    output = os.path.abspath(_OUTPUT.value)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    temporary = f"{output}.tmp-{os.getpid()}.png"
    compose(rows, _IMAGE_SIZE.value).save(temporary)
    os.replace(temporary, output)
    print(f"wrote {output} ({len(rows)} images from {directory})")


if __name__ == "__main__":
    app.run(main)
