"""What training needs to know about a dataset directory: examples per epoch and class count.

Both come from what the mask generator wrote beside the shards (no scan of a 140 GB dataset);
datasets made without it fall back to counting record headers, and have no known class count.
"""

import dataclasses

from detcon.data import shards


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Examples and classes of one split, each with where the number came from."""

    num_examples: int
    examples_source: str
    num_classes: int | None  # None: unknown (no manifest)
    classes_source: str


def read(dataset_directory: str, split: str = "train") -> DatasetInfo:
    """Returns the split's example count and class count (labels 1..num_classes in the records)."""
    paths = shards.list_shards(dataset_directory, split)
    recorded = [shards.recorded_count(p) for p in paths]
    num_examples = sum(c for c in recorded if c is not None)
    unrecorded = [p for p, c in zip(paths, recorded, strict=True) if c is None]
    num_examples += sum(shards.count_records(p) for p in unrecorded)
    manifest_name = shards.manifest_path(dataset_directory, split)
    if not unrecorded:
        examples_source = f"the record counts beside {manifest_name}"
    elif len(unrecorded) == len(paths):
        examples_source = f"record headers of the {len(paths)} shards (no recorded counts)"
    else:
        examples_source = (
            f"recorded counts of {len(paths) - len(unrecorded)} shards and record "
            f"headers of {len(unrecorded)}"
        )
    manifest = shards.read_manifest(dataset_directory, split)
    num_classes = None if manifest is None else manifest.get("num_classes")
    classes_source = manifest_name if num_classes is not None else "unknown (no manifest)"
    return DatasetInfo(num_examples, examples_source, num_classes, classes_source)
