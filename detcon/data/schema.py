"""TFRecord schema of an image with its Felzenszwalb-Huttenlocher (FH) segmentations.

The keys are those of the official DetCon `generate_fh_masks_for_imagenet.py` (itself the slim
`build_imagenet_data.py` layout plus one key), so records written by either tool load in both.

Segment ids wider than a byte.  The official key holds the raw bytes of a uint8 `[K, H, W]` array,
so an image with more than 256 segments cannot be stored there without loss.  When any id exceeds
255 we also write the little-endian uint16 `[K, H, W]` array under `FH_SEGMENTATIONS_UINT16`:
 - our reader prefers that key whenever it is present, so ids up to 65535 survive exactly;
 - the official key then holds `ids % 256`, byte for byte what the official tool would have
   written, so official readers keep working (with the wrapped ids they always had).
Records whose ids all fit in a byte carry only the official key.

Region priors (ours, for DETReg; `scripts/generate_fh_masks.py --region_priors`): every region of
DETReg's fast selective search (detcon/data/build/region_priors.py), boxes stored once:
 - `REGION_BOXES`: float32 `[U, 4]` distinct boxes, xyxy in pixels of the stored image;
 - `REGION_BOX_INDEX`: int `[R]`, each region's box (index into the boxes);
 - `REGION_LEVELS`: int `[R]`, each region's hierarchy level (1 = an FH segment).
The pipeline draws rank U(0,1) x level per region and sample, so the top-k differ every epoch as
a fresh selective search would, while the expensive part runs once.
"""

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

ENCODED = "image/encoded"
HEIGHT = "image/height"
WIDTH = "image/width"
COLORSPACE = "image/colorspace"
CHANNELS = "image/channels"
FORMAT = "image/format"
FILENAME = "image/filename"
LABEL = "image/class/label"
SYNSET = "image/class/synset"
TEXT = "image/class/text"
FH_SEGMENTATIONS = "image/felzenszwalb_segmentations"
# Ours only: lossless copy of the segmentations when an id exceeds 255 (see module docstring).
FH_SEGMENTATIONS_UINT16 = "image/felzenszwalb_segmentations_uint16"
# Ours only: the FH parameters, one entry per stored scale, so a dataset documents itself.
FH_SCALES = "image/felzenszwalb_scales"
FH_MIN_SIZES = "image/felzenszwalb_min_sizes"

# Ours only: region priors (see module docstring).
REGION_BOXES = "image/region_priors/boxes"
REGION_BOX_INDEX = "image/region_priors/box_index"
REGION_LEVELS = "image/region_priors/levels"

MAX_SEGMENT_ID = np.iinfo(np.uint16).max


class TooManySegmentsError(ValueError):
    """FH gave more segments than the uint16 ids hold: a settings problem, not a bad image."""


NO_LABEL = 0  # label 0 is reserved (background / unlabelled), real classes start at 1


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(values: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


def _floats(values: Sequence[float]) -> tf.train.Feature:
    return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))


def build_example(
    *,
    jpeg: bytes,
    height: int,
    width: int,
    segmentations: np.ndarray,
    filename: str,
    label: int = NO_LABEL,
    synset: str = "",
    text: str | None = None,
    fh_scales: Sequence[float] = (),
    fh_min_sizes: Sequence[int] = (),
    region_boxes: np.ndarray | None = None,
    region_box_index: np.ndarray | None = None,
    region_levels: np.ndarray | None = None,
) -> tf.train.Example:
    """Returns the Example for RGB `jpeg` (`height` x `width`) and its `[K, H, W]` segment ids,
    with region priors when given: boxes `[U, 4]`, box index `[R]` and levels `[R]`."""
    if segmentations.ndim != 3 or segmentations.shape[1:] != (height, width):
        raise ValueError(
            f"{filename}: segmentations have shape {segmentations.shape}, expected "
            f"[num_scales, {height}, {width}] to match the image"
        )
    if segmentations.size and (segmentations.min() < 0 or segmentations.max() > MAX_SEGMENT_ID):
        raise TooManySegmentsError(
            f"{filename}: segment ids must lie in [0, {MAX_SEGMENT_ID}], got "
            f"[{segmentations.min()}, {segmentations.max()}]; raise --fh_min_sizes to get fewer "
            "segments"
        )
    feature = {
        ENCODED: _bytes(jpeg),
        HEIGHT: _ints([height]),
        WIDTH: _ints([width]),
        COLORSPACE: _bytes(b"RGB"),
        CHANNELS: _ints([3]),
        FORMAT: _bytes(b"JPEG"),
        FILENAME: _bytes(filename.encode()),
        LABEL: _ints([label]),
        SYNSET: _bytes(synset.encode()),
        # Wraps ids above 255 exactly like the official tool; the lossless copy follows below.
        FH_SEGMENTATIONS: _bytes(segmentations.astype("<u1").tobytes()),
    }
    if text is not None:
        feature[TEXT] = _bytes(text.encode())
    if segmentations.size and segmentations.max() > np.iinfo(np.uint8).max:
        feature[FH_SEGMENTATIONS_UINT16] = _bytes(segmentations.astype("<u2").tobytes())
    if fh_scales:
        feature[FH_SCALES] = _floats(fh_scales)
        feature[FH_MIN_SIZES] = _ints(fh_min_sizes)
    if region_boxes is not None:
        feature.update(_region_features(filename, region_boxes, region_box_index, region_levels))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def _region_features(
    filename: str, boxes: np.ndarray, box_index: np.ndarray | None, levels: np.ndarray | None
) -> dict[str, tf.train.Feature]:
    """Returns the region-prior features, after checking the three arrays fit together."""
    boxes = np.asarray(boxes, np.float32)
    if box_index is None or levels is None:
        raise ValueError(f"{filename}: region priors need boxes, box_index and levels together")
    box_index, levels = np.asarray(box_index), np.asarray(levels)
    if (
        boxes.ndim != 2
        or boxes.shape[1] != 4
        or box_index.shape != levels.shape
        or box_index.ndim != 1
        or not len(boxes)
        or box_index.min(initial=0) < 0
        or box_index.max(initial=0) >= len(boxes)
        or levels.min(initial=1) < 1
    ):
        raise ValueError(
            f"{filename}: region priors must be boxes [U > 0, 4], box_index [R] in [0, U) and "
            f"levels [R] >= 1; got {boxes.shape}, {box_index.shape}, {levels.shape}"
        )
    return {
        REGION_BOXES: _floats(boxes.ravel().tolist()),
        REGION_BOX_INDEX: _ints(box_index.tolist()),
        REGION_LEVELS: _ints(levels.tolist()),
    }


_PARSE_SPEC = {
    ENCODED: tf.io.FixedLenFeature([], tf.string, default_value=""),
    LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=NO_LABEL),
    # VarLen like the official reader: accepts the ids as one bytes entry or split over several.
    FH_SEGMENTATIONS: tf.io.VarLenFeature(tf.string),
    FH_SEGMENTATIONS_UINT16: tf.io.VarLenFeature(tf.string),
}


_REGION_SPEC = {
    REGION_BOXES: tf.io.VarLenFeature(tf.float32),
    REGION_BOX_INDEX: tf.io.VarLenFeature(tf.int64),
    REGION_LEVELS: tf.io.VarLenFeature(tf.int64),
}


def has_region_priors(serialized: bytes) -> bool:
    """Returns whether one serialized record (Python bytes) holds region priors."""
    example = tf.train.Example.FromString(serialized)
    return all(key in example.features.feature for key in _REGION_SPEC)


def parse_record(serialized: tf.Tensor, with_regions: bool = False) -> dict[str, tf.Tensor]:
    """Returns `encoded` (scalar string), `label` (int64 as stored), `fh_ids` (int32 `[K*H*W]`);
    with_regions adds `region_boxes` float32 `[U, 4]`, `region_box_index`, `region_levels`
    int32 `[R]` (empty where the record holds none)."""
    spec = {**_PARSE_SPEC, **_REGION_SPEC} if with_regions else _PARSE_SPEC
    parsed = tf.io.parse_single_example(serialized, spec)
    ids8 = tf.strings.reduce_join(parsed[FH_SEGMENTATIONS].values)
    ids16 = tf.strings.reduce_join(parsed[FH_SEGMENTATIONS_UINT16].values)
    fh_ids = tf.cond(
        tf.strings.length(ids16) > 0,
        lambda: tf.cast(tf.io.decode_raw(ids16, tf.uint16, little_endian=True), tf.int32),
        lambda: tf.cast(tf.io.decode_raw(ids8, tf.uint8), tf.int32),
    )
    record = {"encoded": parsed[ENCODED], "label": parsed[LABEL], "fh_ids": fh_ids}
    if with_regions:
        record["region_boxes"] = tf.reshape(parsed[REGION_BOXES].values, [-1, 4])
        record["region_box_index"] = tf.cast(parsed[REGION_BOX_INDEX].values, tf.int32)
        record["region_levels"] = tf.cast(parsed[REGION_LEVELS].values, tf.int32)
    return record


def reshape_segmentations(fh_ids: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """Returns flat ids `[K*H*W]` as `[K, H, W]`; fails clearly if the size does not fit."""
    pixels = tf.cast(height, tf.int32) * tf.cast(width, tf.int32)
    size = tf.size(fh_ids)
    check = tf.debugging.assert_equal(
        tf.logical_and(size > 0, size % pixels == 0),
        True,
        message=(
            f"record's {FH_SEGMENTATIONS} does not hold [num_scales, H, W] ids for its image; "
            "regenerate the shards with scripts/generate_fh_masks.py"
        ),
    )
    with tf.control_dependencies([check]):
        return tf.reshape(fh_ids, tf.stack([size // pixels, height, width]))
