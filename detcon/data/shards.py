"""Shard file names (`train-00000-of-02048`), listing a split's shards, counting their records."""

import os
import re
import struct

import tensorflow as tf

_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{5,})-of-(?P<count>\d{5,})$")
GENERATE_COMMAND = (
    "python scripts/generate_fh_masks.py --train_directory=/path/to/images "
    "--output_directory={directory}"
)


def shard_name(split: str, index: int, count: int) -> str:
    """Returns the file name of shard `index` of `count`, e.g. `train-00003-of-02048`."""
    return f"{split}-{index:05d}-of-{count:05d}"


def list_shards(dataset_directory: str, split: str) -> list[str]:
    """Returns the sorted paths of all shards of `split`; FileNotFoundError if any are missing."""
    hint = GENERATE_COMMAND.format(directory=dataset_directory)
    if not tf.io.gfile.isdir(dataset_directory):
        raise FileNotFoundError(
            f"dataset directory {dataset_directory!r} does not exist; make it with: {hint}"
        )
    found: dict[int, set[int]] = {}
    for name in tf.io.gfile.listdir(dataset_directory):
        match = _SHARD_RE.match(name.rstrip("/"))
        if match and match["split"] == split:
            found.setdefault(int(match["count"]), set()).add(int(match["index"]))
    if not found:
        raise FileNotFoundError(
            f"no {split!r} shards ({split}-NNNNN-of-NNNNN) in {dataset_directory!r}; "
            f"make them with: {hint}"
        )
    if len(found) > 1:
        raise ValueError(
            f"{dataset_directory!r} mixes {split!r} shard sets of sizes {sorted(found)}; "
            "keep one set (delete the others)"
        )
    ((count, indices),) = found.items()
    missing = sorted(set(range(count)) - indices)
    if missing:
        raise FileNotFoundError(
            f"{dataset_directory!r} has {len(indices)} of {count} {split!r} shards "
            f"(first missing: {shard_name(split, missing[0], count)}); the mask generation did not "
            "finish: re-run the same scripts/generate_fh_masks.py command to complete it"
        )
    return [os.path.join(dataset_directory, shard_name(split, i, count)) for i in range(count)]


def count_records(path: str) -> int:
    """Returns the number of records in a TFRecord file, reading only the 12-byte record headers."""
    count = 0
    with tf.io.gfile.GFile(path, "rb") as handle:
        size = handle.size()
        position = 0
        while position < size:
            header = handle.read(12)
            if len(header) != 12:
                raise ValueError(f"{path}: truncated TFRecord header at byte {position}")
            (length,) = struct.unpack("<Q", header[:8])
            # Record layout: length (8) + length crc (4) + data (length) + data crc (4).
            position += 12 + length + 4
            if position > size:
                raise ValueError(f"{path}: truncated TFRecord data at byte {position - length - 4}")
            handle.seek(position)
            count += 1
    return count
