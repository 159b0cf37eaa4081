"""Shard file names (`train-00000-of-02048`), listing a split's shards, counting their records.

Beside the shards, the mask generator writes `fh_masks_<split>.json` (its settings, the input
count and the class count) and `fh_masks_<split>_counts/<shard>` (records per finished shard), so
training learns the dataset's size and classes without reading it.
"""

import hashlib
import json
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


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with tf.io.gfile.GFile(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def shard_problem(path: str, entry: dict | None) -> str | None:
    """Why shard `path` is damaged (None: sound), against its manifest entry {"records",
    "bytes", "sha256"} when there is one, else by walking its record headers."""
    try:
        size = tf.io.gfile.stat(path).length
        if entry is not None:
            if size != entry["bytes"]:
                return f"{size} bytes where {entry['bytes']} were written"
            if file_digest(path) != entry["sha256"]:
                return "its checksum differs from the one recorded when it was written"
            return None
        count_records(path)
    except ValueError as error:
        return str(error).split(": ", 1)[-1]
    except (OSError, tf.errors.OpError) as error:
        return f"unreadable ({error})"
    return None


def damaged_shards(paths: list[str]) -> list[tuple[str, str]]:
    """(path, reason) of each damaged shard among `paths` (checked against their manifest)."""
    entries: dict[str, dict] = {}
    found = []
    for path in paths:
        directory, name = os.path.split(path)
        match = _SHARD_RE.match(name)
        split = match["split"] if match else ""
        if split not in entries:
            entries[split] = (read_manifest(directory, split) or {}).get("shards", {})
        problem = shard_problem(path, entries[split].get(name))
        if problem:
            found.append((path, problem))
    return found


def regenerate_hint(directory: str) -> str:
    """How to rewrite damaged shards: the generator verifies shards and rewrites the bad ones."""
    return (
        "re-run the scripts/generate_fh_masks.py command that made "
        f"{directory} (same flags; it checks every shard and rewrites damaged ones), e.g. "
        + GENERATE_COMMAND.format(directory=directory)
    )


def manifest_path(dataset_directory: str, split: str) -> str:
    """Returns where a split's generation manifest lives."""
    return os.path.join(dataset_directory, f"fh_masks_{split}.json")


def read_manifest(dataset_directory: str, split: str) -> dict | None:
    """Returns a split's manifest, or None for datasets made without one."""
    path = manifest_path(dataset_directory, split)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as handle:
        return json.load(handle)


def _count_path(shard_path: str) -> str:
    directory, name = os.path.split(shard_path)
    match = _SHARD_RE.match(name)
    if not match:
        raise ValueError(f"{shard_path!r} is not a shard name like train-00000-of-00001")
    return os.path.join(directory, f"fh_masks_{match['split']}_counts", name)


def write_record_count(shard_path: str, count: int) -> None:
    """Records how many records a finished shard holds (atomically, beside the shards)."""
    path = _count_path(shard_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(f"{count}\n")
    os.replace(temporary, path)


def recorded_count(shard_path: str) -> int | None:
    """Returns the record count the generator wrote for a shard, or None if it wrote none."""
    path = _count_path(shard_path)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as handle:
        return int(handle.read().strip())
