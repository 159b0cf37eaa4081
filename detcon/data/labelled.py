"""Labelled image sources for the kNN and linear probes: our TFRecords, or TFDS datasets by name.

TFRecords are those of scripts/generate_fh_masks.py (and the scenes generator): `train-*` and
`validation-*` shards with labels 1..N (0 = unlabelled, dropped). TFDS datasets are read from
`data_dir` and never downloaded. Batches are `{image [D, b, S, S, 3] float in [0, 1],
label [D, b] int32}`; evaluation batches are centre crops padded with label -1.
"""

import math
from typing import Iterator

import numpy as np
import tensorflow as tf

from detcon.data import image_codec, pipeline, schema, shards, views
from detcon.data.sources import Source

TFRECORD_SPLITS = ("train", "validation")


def _tfds_builder(source: Source):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(source.tfds_name, data_dir=source.tfds_data_dir)
    except Exception as error:  # tfds raises several types for unknown names
        raise ValueError(f"--tfds_name={source.tfds_name!r}: {error}") from error


def split_name(source: Source, train: bool) -> str:
    """The split read for training (the probe's fit, the kNN bank) or for evaluation."""
    if not source.tfds_name:
        return TFRECORD_SPLITS[0] if train else TFRECORD_SPLITS[1]
    if train:
        return source.tfds_train_split
    if source.tfds_eval_split:
        return source.tfds_eval_split
    splits = _tfds_builder(source).info.splits
    return "validation" if splits and "validation" in splits else "test"


def _tfds_examples(
    source: Source, split: str, shuffle: bool, process_index: int, process_count: int
) -> tf.data.Dataset:
    """(image uint8 [H, W, 3], label int32) pairs of a TFDS split, this process's share."""
    dataset = _tfds_builder(source).as_dataset(
        split=split, as_supervised=True, shuffle_files=shuffle
    )
    # Record-level sharding: every process gets a known share (range(index, total, count)).
    dataset = dataset.shard(process_count, process_index)
    return dataset.map(lambda image, label: (image, tf.cast(label, tf.int32)))


def _tfrecord_examples(
    source: Source, split: str, shuffle: bool, process_index: int, process_count: int
) -> tf.data.Dataset:
    """(image uint8 [H, W, 3], label int32 0-based, -1 unlabelled) pairs of our shards."""
    paths = shards.list_shards(source.directory, split)
    files, example_level = pipeline.split_for_process(paths, process_index, process_count)
    if shuffle:
        files = list(np.random.default_rng(process_index).permutation(files))
    records = tf.data.TFRecordDataset(files)
    if example_level:
        records = records.shard(process_count, process_index)

    def decode(serialized):
        record = schema.parse_record(serialized)
        label = tf.cast(tf.where(record["label"] > 0, record["label"] - 1, -1), tf.int32)
        return image_codec.decode_rgb(record["encoded"]), label

    return records.map(decode, num_parallel_calls=tf.data.AUTOTUNE)


def _examples(
    source: Source,
    split: str,
    shuffle: bool = False,
    process_index: int = 0,
    process_count: int = 1,
) -> tf.data.Dataset:
    read = _tfds_examples if source.tfds_name else _tfrecord_examples
    return read(source, split, shuffle, process_index, process_count)


def num_examples(source: Source, split: str) -> int:
    """Examples in a split (TFRecords: record headers; TFDS: its metadata, else counted)."""
    if not source.tfds_name:
        return sum(shards.count_records(p) for p in shards.list_shards(source.directory, split))
    splits = _tfds_builder(source).info.splits
    if splits and split in splits:
        return int(splits[split].num_examples)
    return int(_examples(source, split).reduce(0, lambda count, _: count + 1))


def num_classes(source: Source) -> int:
    """Classes of the training split: TFDS metadata, or the largest label in our records."""
    if source.tfds_name:
        return int(_tfds_builder(source).info.features["label"].num_classes)
    paths = shards.list_shards(source.directory, split_name(source, train=True))
    labels = tf.data.TFRecordDataset(paths).map(
        lambda record: schema.parse_record(record)["label"], num_parallel_calls=tf.data.AUTOTUNE
    )
    largest = int(labels.reduce(tf.constant(0, tf.int64), tf.maximum))
    if largest < 1:
        raise ValueError(
            f"{source.directory}: the train records carry no labels (1..N); the "
            "linear probe needs labelled data."
        )
    return largest  # stored labels count from 1


def eval_batches(
    source: Source,
    split: str,
    image_size: int,
    local_devices: int,
    per_device: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[Iterator[dict[str, np.ndarray]], int]:
    """(one pass of centre-crop batches padded with label -1, number of batches)."""
    total = num_examples(source, split)
    local_batch = local_devices * per_device
    per_process = math.ceil(total / process_count)  # every process yields as many batches
    num_batches = math.ceil(per_process / local_batch)
    if not source.tfds_name:  # the training pipeline's reader, which pads the same way
        return pipeline.eval_batches(
            source.directory,
            split=split,
            image_size=image_size,
            local_devices=local_devices,
            per_device_batch=per_device,
            process_index=process_index,
            process_count=process_count,
        ), num_batches
    mine = len(range(process_index, total, process_count))
    padding = num_batches * local_batch - mine

    def to_eval(image, label):
        return {"image": views.centre_view(image, image_size), "label": label}

    pad = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros([image_size, image_size, 3], tf.float32),
            "label": tf.constant(-1, tf.int32),
        }
    ).repeat(padding)
    dataset = (
        _examples(source, split, False, process_index, process_count)
        .map(to_eval, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .concatenate(pad)
        .batch(per_device, drop_remainder=True)
        .batch(local_devices, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return dataset.as_numpy_iterator(), num_batches


def augmented_train_batches(
    source: Source,
    image_size: int,
    local_devices: int,
    per_device: int,
    seed: int = 0,
    shuffle_buffer: int = 10_000,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches of labelled examples as random-resized crops (8-100 %) with flips."""
    split = split_name(source, train=True)

    def random_view(index, example):
        image, label = example
        key = tf.stack([tf.constant(seed * 1_000_003 + process_index, tf.int64), index])
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(key, num=2))
        offset, size = views.random_crop_window(tf.shape(image), crop_seed)
        flip = tf.random.stateless_uniform([], flip_seed) < 0.5
        # The pretraining crop op takes a mask too; a zero one costs a nearest resize only.
        zeros = tf.zeros(tf.shape(image)[:2], tf.int32)
        view, _ = views.crop_flip_resize(image, zeros, offset, size, flip, image_size)
        return {"image": view, "label": label}

    dataset = (
        _examples(source, split, True, process_index, process_count)
        .filter(lambda image, label: label >= 0)
        .repeat()
        .shuffle(shuffle_buffer, seed=seed)
        .enumerate()
        .map(random_view, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(per_device, drop_remainder=True)
        .batch(local_devices, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )
    return dataset.as_numpy_iterator()
