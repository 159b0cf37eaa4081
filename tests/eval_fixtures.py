"""Small on-disk datasets for the evaluation tests: labelled TFRecords and a VOC-layout set."""

import os

import numpy as np
from PIL import Image

# The first entries of the PASCAL VOC colour map (index -> RGB), enough for the fixtures.
VOC_PALETTE = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]


def class_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3]: a noisy image whose dominant colour channel is set by `label`."""
    image = rng.integers(0, 60, size=(size, size, 3)).astype(np.uint8)
    image[..., label % 3] = 200 if label < 3 else 120
    return image


def write_tfrecords(
    directory: str,
    per_class: dict[str, int],
    num_classes: int,
    size: int = 40,
    seed: int = 0,
    labelled: bool = True,
) -> None:
    """train/validation shards in our schema, labels stored 1..num_classes (0, unlabelled, when
    not `labelled`), classes by colour."""
    import tensorflow as tf

    from detcon.data import image_codec, schema, shards

    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for split, count in per_class.items():
        path = os.path.join(directory, shards.shard_name(split, 0, 1))
        with tf.io.TFRecordWriter(path) as writer:
            for i in range(count * num_classes):
                label = i % num_classes
                jpeg = image_codec.encode_jpeg(class_image(label, size, rng))
                example = schema.build_example(
                    jpeg=jpeg,
                    height=size,
                    width=size,
                    filename=f"{split}_{i}.jpg",
                    segmentations=np.zeros((1, size, size), np.uint8),
                    label=label + 1 if labelled else schema.NO_LABEL,
                )
                writer.write(example.SerializeToString())


def palette_png(labels: np.ndarray, path: str) -> None:
    """Writes class indices [H, W] as a VOC-style palette ('P') PNG."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [c for rgb in VOC_PALETTE for c in rgb]
    image.putpalette(flat + [224, 224, 192] * (256 - len(VOC_PALETTE)))  # 255: VOC's boundary
    image.save(path)


def scene(height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An image with a bright square (class 1) and a dark disc (class 2) on grey, with a 255 rim."""
    image = np.full((height, width, 3), 128, np.uint8)
    label = np.zeros((height, width), np.uint8)
    y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
    side = min(height, width) // 2
    image[y : y + side, x : x + side] = (240, 240, 40)
    label[y : y + side, x : x + side] = 1
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (side // 2) ** 2
    rim = ((yy - cy) ** 2 + (xx - cx) ** 2 < (side // 2 + 1) ** 2) & ~disc
    image[disc] = (20, 20, 120)
    label[disc] = 2
    label[rim] = 255
    return image, label


def write_voc(
    root: str,
    num_train: int = 6,
    num_val: int = 4,
    height: int = 48,
    width: int = 64,
    seed: int = 0,
) -> None:
    """A PASCAL VOC-layout set: JPEGImages, palette PNGs in SegmentationClass, ImageSets."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        ids = [f"{split}_{i:03d}" for i in range(count)]
        for image_id in ids:
            image, label = scene(height, width, rng)
            Image.fromarray(image).save(
                os.path.join(root, "JPEGImages", image_id + ".jpg"), quality=95
            )
            palette_png(label, os.path.join(root, "SegmentationClass", image_id + ".png"))
        with open(os.path.join(root, "ImageSets", "Segmentation", split + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
