"""A small real-photo DetCon dataset built from scikit-image's bundled sample images (no network).

Six photographs (one class each) become 30 train records (original, mirror, three crops) and 6
validation records (a fourth crop), at most 192 pixels on the long side so FH and training stay
fast on a laptop CPU.  Built once, atomically, with the same record writer as the mask script.
"""

import json
import os
import random

import numpy as np
import skimage.data
from PIL import Image

from detcon.data import image_codec, shards
from detcon.data.build import fh_records, mask_job, publish

DEFAULT_DIRECTORY_NAME = "demo_fh"
MAX_SIDE = 192
# skimage.data loaders whose files ship inside the scikit-image wheel (no pooch download).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins")
# ImageNet's 1000/1000 would leave 1-9 segments on images this small (~1/6 of ImageNet's area);
# 500/250 gives 8-25, about what ImageNet photos get with the defaults.
PARAMS = mask_job.FhParams(scales=(500.0,), min_sizes=(250,))
# (name, top, left, height, width) as fractions of the photo; train and validation share none.
_TRAIN_VARIANTS = (
    ("full", 0.0, 0.0, 1.0, 1.0),
    ("crop_top_left", 0.0, 0.0, 0.75, 0.75),
    ("crop_bottom_right", 0.25, 0.25, 0.75, 0.75),
    ("crop_centre", 0.15, 0.15, 0.7, 0.7),
)
_VALIDATION_VARIANTS = (("crop_wide", 0.1, 0.0, 0.8, 1.0),)


def data_home() -> str:
    """Returns `$DETCON_DATA_HOME`, default `~/.cache/detcon`."""
    return os.environ.get("DETCON_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "detcon"
    )


def _photo(name: str) -> np.ndarray:
    """Returns uint8 `[H, W, 3]` of a bundled sample, grey ones as RGB, shrunk to MAX_SIDE."""
    pixels = getattr(skimage.data, name)()
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    image = Image.fromarray(pixels[..., :3].astype(np.uint8))
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(image)


def _crop(pixels: np.ndarray, top: float, left: float, height: float, width: float) -> np.ndarray:
    h, w = pixels.shape[:2]
    y, x = round(top * h), round(left * w)
    return pixels[y : y + round(height * h), x : x + round(width * w)]


def _records(split: str) -> list[bytes]:
    """Returns the serialized records of one split, in a fixed shuffled order (classes mixed)."""
    records = []
    for label, name in enumerate(PHOTOS, start=1):
        photo = _photo(name)
        variants = []
        for variant, *window in _TRAIN_VARIANTS if split == "train" else _VALIDATION_VARIANTS:
            variants.append((variant, _crop(photo, *window)))
        if split == "train":
            variants.append(("mirror", photo[:, ::-1]))
        for variant, pixels in variants:
            records.append(
                fh_records.encode_record(
                    image_codec.encode_jpeg(np.ascontiguousarray(pixels)),
                    filename=f"{name}_{variant}.jpg",
                    label=label,
                    synset=name,
                    text=name,
                    scales=PARAMS.scales,
                    min_sizes=PARAMS.min_sizes,
                )
            )
    random.Random(0).shuffle(records)
    return records


def _build(directory: str) -> None:
    for split, num_shards in (("train", 2), ("validation", 1)):
        records = _records(split)
        for index, (start, end) in enumerate(mask_job.shard_bounds(len(records), num_shards)):
            path = os.path.join(directory, shards.shard_name(split, index, num_shards))
            with fh_records.atomic_shard(path) as writer:
                for record in records[start:end]:
                    writer.write(record)
    _describe(directory)


def _describe(directory: str) -> None:
    """Writes the manifests and record counts training reads (as the mask generator does)."""
    for split in ("train", "validation"):
        for path in shards.list_shards(directory, split):
            shards.write_record_count(path, shards.count_records(path))
        manifest = {
            "version": mask_job.MANIFEST_VERSION,
            "split": split,
            "source": "demo",
            "num_classes": len(PHOTOS),
            "fh_scales": list(PARAMS.scales),
            "fh_min_sizes": list(PARAMS.min_sizes),
        }
        path = shards.manifest_path(directory, split)
        temporary = f"{path}.tmp-{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
        os.replace(temporary, path)


def ensure_demo_dataset(directory: str | None = None) -> str:
    """Returns the demo dataset directory (default `$DETCON_DATA_HOME/demo_fh`), built if absent."""
    directory = os.path.abspath(directory or os.path.join(data_home(), DEFAULT_DIRECTORY_NAME))
    if os.path.isdir(directory):
        if not os.path.exists(shards.manifest_path(directory, "train")):
            _describe(directory)  # built by an older version, which wrote no manifest
        return directory
    publish.publish_directory(directory, _build)  # a lost race leaves the winner's identical copy
    return directory
