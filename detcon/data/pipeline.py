"""tf.data input: DetCon TFRecord shards -> numpy batches `[local_devices, per_device_batch, ...]`.

Pretraining yields two views per image with their FH masks cropped and flipped alongside; evaluation
yields centre crops.  Images are float32 in [0, 1]; normalisation happens on device.

Reproducibility: epoch `e` reads the files in an order seeded by (seed, e) and shuffles records
with a buffer seeded by (seed, e), so `start_step` resumes the same order by skipping raw records
(before any decoding); augmentation seeds derive from (seed, process, epoch, position in epoch).
With `deterministic=True` this order is exact; otherwise tf.data may reorder records for speed.
"""

import math
import os
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from detcon import errors
from detcon.data import detreg_views, image_codec, schema, shards, views

list_shards = shards.list_shards  # part of this module's interface (the training loop imports it)

# Fixed, not AUTOTUNE, so the record order does not depend on the host's core count.
_INTERLEAVE_CYCLE = 16
_SEED_MIX = 0x9E3779B1  # spreads (seed, process) pairs apart in the stateless seed space


def num_examples(dataset_directory: str, split: str = "train") -> int:
    """Returns the number of records in all shards of `split` (reads record headers only)."""
    return sum(shards.count_records(p) for p in list_shards(dataset_directory, split))


def split_for_process(
    paths: list[str], process_index: int, process_count: int
) -> tuple[list[str], bool]:
    """Returns (this process's files, whether to shard records instead: files < processes)."""
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in [0, process_count={process_count})"
        )
    if len(paths) >= process_count:
        return paths[process_index::process_count], False
    return list(paths), True


def _label(stored: tf.Tensor) -> tf.Tensor:
    # Stored labels count from 1 (0 = no label); training uses 0-based classes and -1 for none.
    return tf.cast(tf.where(stored > 0, stored - 1, -1), tf.int32)


def decode_example(serialized: tf.Tensor, with_masks: bool = True) -> dict[str, tf.Tensor]:
    """Returns `image` uint8 `[H, W, 3]`, `fh` int32 `[K, H, W]` (with_masks), `label` int32
    (-1: none). Without masks, records need not hold any."""
    record = schema.parse_record(serialized)
    image = image_codec.decode_rgb(record["encoded"])
    example = {"image": image, "label": _label(record["label"])}
    if with_masks:
        shape = tf.shape(image)
        example["fh"] = schema.reshape_segmentations(record["fh_ids"], shape[0], shape[1])
    return example


def _regenerate_hint(dataset_directory: str) -> str:
    return (
        f"regenerate {dataset_directory!r} with scripts/generate_fh_masks.py --region_priors "
        "(same other flags; or scripts/make_scenes.py --region_priors for the scenes)"
    )


def check_region_priors(paths: list[str], dataset_directory: str) -> None:
    """Raises DatasetMismatchError (one line, naming --region_priors) if the first record has
    none; the trainer prints it without a traceback."""
    for path in paths:
        for serialized in tf.data.TFRecordDataset(path).take(1).as_numpy_iterator():
            if not schema.has_region_priors(serialized):
                raise errors.DatasetMismatchError(
                    f"the records in {dataset_directory!r} hold no region priors "
                    f"({schema.REGION_BOXES}), which this method needs; "
                    + _regenerate_hint(dataset_directory)
                )
            return


def decode_detreg_example(serialized: tf.Tensor, dataset_directory: str = "") -> dict:
    """Returns `image` uint8 `[H, W, 3]`, `label` int32 and the region priors of one record."""
    record = schema.parse_record(serialized, with_regions=True)
    check = tf.debugging.assert_positive(
        tf.size(record["region_levels"]),
        message="a record holds no region priors; " + _regenerate_hint(dataset_directory),
    )
    with tf.control_dependencies([check]):
        image = image_codec.decode_rgb(record["encoded"])
    return {
        "image": image,
        "label": _label(record["label"]),
        "region_boxes": record["region_boxes"],
        "region_box_index": record["region_box_index"],
        "region_levels": record["region_levels"],
    }


def detreg_sample(
    example: dict[str, tf.Tensor], image_size: int, num_regions: int, seed: tf.Tensor
) -> dict[str, tf.Tensor]:
    """Returns one DETReg sample (detreg_views.detreg_view's keys) with its `label`."""
    sample = detreg_views.detreg_view(
        example["image"],
        example["region_boxes"],
        example["region_box_index"],
        example["region_levels"],
        num_regions,
        image_size,
        seed,
    )
    sample["label"] = example["label"]
    return sample


def two_views(
    example: dict[str, tf.Tensor],
    image_size: int,
    fh_mask_index: int,
    seed: tf.Tensor,
    max_mask_id: int = 256,
    crop_min_area: float = views.CROP_AREA_RANGE[0],
) -> dict[str, tf.Tensor]:
    """Returns `view1`, `view2` float32 `[S, S, 3]`, `fh_mask1`, `fh_mask2` int32 `[S, S]`,
    `folded_segments` int32 and `label`.

    The views use independent crops and flips; each mask gets exactly its own view's geometry,
    then its segments are renumbered 0..K-1 (`views.reindex_segments`); `folded_segments` counts
    the segments of both views merged into id `max_mask_id - 1` because K > `max_mask_id`.
    An example without `fh` (a method that needs no masks) gives the same views, without masks.
    """
    if "fh" not in example:
        seed1, seed2 = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
        return {
            "view1": views.random_image_view(example["image"], image_size, seed1, crop_min_area),
            "view2": views.random_image_view(example["image"], image_size, seed2, crop_min_area),
            "label": example["label"],
        }
    fh = example["fh"]
    check = tf.debugging.assert_less(
        fh_mask_index,
        tf.shape(fh)[0],
        message=f"fh_mask_index={fh_mask_index} but the records hold fewer FH masks "
        "(one per --fh_scales entry of scripts/generate_fh_masks.py)",
    )
    with tf.control_dependencies([check]):
        mask = fh[fh_mask_index]
    seed1, seed2 = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    view1, mask1 = views.random_view(example["image"], mask, image_size, seed1, crop_min_area)
    view2, mask2 = views.random_view(example["image"], mask, image_size, seed2, crop_min_area)
    mask1, folded1 = views.reindex_segments(mask1, max_mask_id)
    mask2, folded2 = views.reindex_segments(mask2, max_mask_id)
    return {
        "view1": view1,
        "view2": view2,
        "fh_mask1": mask1,
        "fh_mask2": mask2,
        "folded_segments": folded1 + folded2,
        "label": example["label"],
    }


def _epoch_size(
    paths: list[str], files: list[str], example_level: bool, process_index: int, process_count: int
) -> int:
    """Returns how many records this process reads per epoch (reads record headers only)."""
    if not example_level:
        return sum(shards.count_records(p) for p in files)
    total = sum(shards.count_records(p) for p in paths)
    return len(range(process_index, total, process_count))


def _epoch_records(
    files: tf.Tensor,
    epoch: tf.Tensor,
    *,
    seed: int,
    shuffle_buffer: int,
    deterministic: bool,
    example_shard: tuple[int, int] | None,
    first_epoch: int,
    skip_in_first_epoch: int,
) -> tf.data.Dataset:
    """Returns (epoch, position, serialized record) for one epoch in its seeded order."""
    epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
    ordered = tf.random.experimental.stateless_shuffle(files, seed=epoch_seed)
    num_files = int(files.shape[0])
    records = tf.data.Dataset.from_tensor_slices(ordered).interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(num_files, _INTERLEAVE_CYCLE),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
        # Record-level sharding needs the same stream on every process.
        deterministic=deterministic or example_shard is not None,
    )
    if example_shard is not None:
        records = records.shard(*example_shard)
    records = records.shuffle(shuffle_buffer, seed=seed * 1_000_003 + epoch)
    records = records.enumerate()
    skip = tf.where(
        epoch == first_epoch, tf.constant(skip_in_first_epoch, tf.int64), tf.constant(0, tf.int64)
    )
    return records.skip(skip).map(lambda position, record: (epoch, position, record))


def naming_damaged_shards(batches: Iterator[dict], paths: list[str]) -> Iterator[dict]:
    """`batches`, where TF's DataLossError (which names no file) becomes a one-line
    DamagedDataError naming the damaged shard and the command that rewrites it."""
    try:
        yield from batches
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
        damaged = shards.damaged_shards(paths)
        directory = os.path.dirname(paths[0]) if paths else "the dataset"
        if not damaged:
            if isinstance(error, tf.errors.InvalidArgumentError):
                raise  # not a damaged file: a real bug, keep its traceback
            damaged = [(directory, error.message.splitlines()[0])]
        names = "; ".join(f"{path}: {reason}" for path, reason in damaged[:3])
        more = f" (and {len(damaged) - 3} more)" if len(damaged) > 3 else ""
        raise errors.DamagedDataError(
            f"damaged TFRecord shard {names}{more}; {shards.regenerate_hint(directory)}"
        ) from None


def pretrain_batches(
    dataset_directory: str,
    *,
    split: str = "train",
    image_size: int,
    local_devices: int,
    per_device_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    fh_mask_index: int = 0,
    max_mask_id: int = 256,
    seed: int = 0,
    start_step: int = 0,
    deterministic: bool = False,
    shuffle_buffer: int = 10_000,
    num_parallel_calls: int | None = None,
    with_masks: bool = True,
    crop_min_area: float = views.CROP_AREA_RANGE[0],
    num_regions: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Returns an endless iterator of batches `[D, b, ...]` of two views with their FH masks.

    num_regions = k > 0 (DETReg) gives one view with its region priors instead
    (detcon/data/detreg_views.py): `view1` float32 `[D, b, S, S, 3]` in [0, 1] at the top-left of
    the canvas, `pad_mask` bool `[D, b, S, S]`, `region_boxes` float32 `[D, b, k, 4]` cxcywh
    normalised by the unpadded image, `region_valid` bool `[D, b, k]`, `label`; records must hold
    region priors (scripts/generate_fh_masks.py --region_priors).

    with_masks=False (methods that need none): no mask keys, and records need not hold masks.
    crop_min_area: smallest crop as a fraction of the image (0.08 BYOL/DetCon, 0.2 MoCo v2).

    Keys: `view1`, `view2` float32 `[D, b, S, S, 3]` in [0, 1]; `fh_mask1`, `fh_mask2` int32
    `[D, b, S, S]` segment ids renumbered per view into [0, max_mask_id); `folded_segments` int32
    `[D, b]` segments merged into the last id; `label` int32 `[D, b]` (0-based class, -1 for
    unlabelled).

    The shuffle buffer holds `shuffle_buffer` raw records (JPEG + mask bytes, ~300 KB each for
    ImageNet), so the default 10_000 needs ~3 GB of host memory per process.
    """
    if min(image_size, local_devices, per_device_batch, shuffle_buffer) < 1 or start_step < 0:
        raise ValueError(
            "image_size, local_devices, per_device_batch and shuffle_buffer must be >= 1 and "
            f"start_step >= 0; got {image_size}, {local_devices}, {per_device_batch}, "
            f"{shuffle_buffer}, {start_step}"
        )
    paths = list_shards(dataset_directory, split)
    files, example_level = split_for_process(paths, process_index, process_count)
    if not any(tf.io.gfile.stat(p).length for p in files):
        raise ValueError(
            f"the {split!r} shards in {dataset_directory!r} for this process hold no records"
        )
    if num_regions < 0:
        raise ValueError(f"num_regions must be >= 0, got {num_regions}")
    if num_regions:
        check_region_priors(files, dataset_directory)
    local_batch = local_devices * per_device_batch
    first_epoch, skip_in_first_epoch = 0, 0
    if start_step:
        epoch_size = _epoch_size(paths, files, example_level, process_index, process_count)
        if epoch_size == 0:
            raise ValueError(
                f"process {process_index} gets no {split!r} records from {dataset_directory!r}"
            )
        first_epoch, skip_in_first_epoch = divmod(start_step * local_batch, epoch_size)

    files_tensor = tf.constant(files)
    example_shard = (process_count, process_index) if example_level else None

    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        return _epoch_records(
            files_tensor,
            epoch,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            deterministic=deterministic,
            example_shard=example_shard,
            first_epoch=first_epoch,
            skip_in_first_epoch=skip_in_first_epoch,
        )

    stream_seed = (seed * _SEED_MIX + process_index) % (2**62)

    def make_pair(epoch: tf.Tensor, position: tf.Tensor, record: tf.Tensor) -> dict[str, tf.Tensor]:
        key = tf.stack([tf.constant(stream_seed, tf.int64), epoch * (2**40) + position])
        if num_regions:
            example = decode_detreg_example(record, dataset_directory)
            return detreg_sample(example, image_size, num_regions, key)
        return two_views(
            decode_example(record, with_masks),
            image_size,
            fh_mask_index,
            key,
            max_mask_id,
            crop_min_area,
        )

    parallel = tf.data.AUTOTUNE if num_parallel_calls is None else num_parallel_calls
    dataset = (
        tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
        .flat_map(epoch_records)
        .map(make_pair, num_parallel_calls=parallel, deterministic=deterministic)
        .batch(per_device_batch, drop_remainder=True)
        .batch(local_devices, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    options = tf.data.Options()
    options.deterministic = deterministic
    # Returned, not yielded from: bad arguments and missing shards fail at the call, not at next().
    return naming_damaged_shards(dataset.with_options(options).as_numpy_iterator(), paths)


def eval_batches(
    dataset_directory: str,
    *,
    split: str = "validation",
    image_size: int,
    local_devices: int,
    per_device_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Returns one pass of `image` float32 `[D, b, S, S, 3]` centre crops, `label` int32 `[D, b]`.

    Every record is used once.  The last batches are padded with zero images of label -1 (mask
    them out of metrics), and every process yields the same number of batches, so multi-host
    evaluation never waits on a process that ran out.
    """
    paths = list_shards(dataset_directory, split)
    files, example_level = split_for_process(paths, process_index, process_count)
    counts = [shards.count_records(p) for p in paths]
    if example_level:
        total = sum(counts)
        per_process = [len(range(i, total, process_count)) for i in range(process_count)]
    else:
        per_process = [sum(counts[i::process_count]) for i in range(process_count)]
    local_batch = local_devices * per_device_batch
    num_batches = math.ceil(max(per_process) / local_batch)
    padding = num_batches * local_batch - per_process[process_index]

    def to_eval(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        record = schema.parse_record(serialized)
        image = views.centre_view(image_codec.decode_rgb(record["encoded"]), image_size)
        return {"image": image, "label": _label(record["label"])}

    records = tf.data.TFRecordDataset(files)
    if example_level:
        records = records.shard(process_count, process_index)
    pad = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros([image_size, image_size, 3], tf.float32),
            "label": tf.constant(-1, tf.int32),
        }
    ).repeat(padding)
    dataset = (
        records.map(to_eval, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .concatenate(pad)
        .batch(per_device_batch, drop_remainder=True)
        .batch(local_devices, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return naming_damaged_shards(dataset.as_numpy_iterator(), paths)
