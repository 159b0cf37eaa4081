"""One image file -> one serialized DetCon record (RGB JPEG + FH masks); atomic shard files."""

import contextlib
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf
from skimage.segmentation import felzenszwalb

from detcon.data import image_codec, schema
from detcon.data.build import region_priors


def fh_segmentations(
    pixels: np.ndarray, scales: Sequence[float], min_sizes: Sequence[int]
) -> np.ndarray:
    """Returns int64 `[K, H, W]` FH segment ids of uint8 `[H, W, 3]` pixels, one map per scale."""
    # sigma stays at scikit-image's default (0.8), as in the official tool.
    return np.stack(
        [felzenszwalb(pixels, scale=s, min_size=m) for s, m in zip(scales, min_sizes, strict=True)]
    )


def encode_record(
    data: bytes,
    *,
    filename: str,
    label: int,
    synset: str,
    text: str | None,
    scales: Sequence[float],
    min_sizes: Sequence[int],
    with_region_priors: bool = False,
) -> bytes:
    """Returns the serialized Example for raw image file bytes; raises image_codec.BadImageError.

    with_region_priors adds DETReg's selective-search regions (detcon/data/build/region_priors.py).
    """
    jpeg, pixels = image_codec.to_rgb_jpeg(data)
    # FH runs on the pixels training decodes from `jpeg`, not on the source file's pixels.
    segmentations = fh_segmentations(pixels, scales, min_sizes)
    height, width = pixels.shape[:2]
    regions = region_priors.selective_search(pixels) if with_region_priors else None
    example = schema.build_example(
        jpeg=jpeg,
        height=height,
        width=width,
        segmentations=segmentations,
        filename=filename,
        label=label,
        synset=synset,
        text=text,
        fh_scales=scales,
        fh_min_sizes=min_sizes,
        region_boxes=None if regions is None else regions.boxes,
        region_box_index=None if regions is None else regions.box_index,
        region_levels=None if regions is None else regions.levels,
    )
    # Map order otherwise varies between processes; re-runs should be byte-identical.
    return example.SerializeToString(deterministic=True)


def temporary_path(path: str) -> str:
    """Returns the hidden name a shard has until complete (it never matches shard globs)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_shard(path: str) -> Iterator[tf.io.TFRecordWriter]:
    """Yields a TFRecord writer whose file appears at `path` only if the block completes."""
    temporary = temporary_path(path)
    writer = tf.io.TFRecordWriter(temporary)
    try:
        yield writer
        writer.close()
        # fsync before rename: a crash must never leave a complete-looking but empty shard.
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
