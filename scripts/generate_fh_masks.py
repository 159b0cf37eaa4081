r"""Writes TFRecord shards of images with their Felzenszwalb-Huttenlocher (FH) masks for DetCon.

A drop-in replacement for the official `generate_fh_masks_for_imagenet.py`: same flags, same
records (detcon/data/schema.py), plus worker processes, a real seeded shuffle, resumable shards,
skipping (and counting) files that do not decode, and lossless segment ids above 255 (kept as
uint16 under `image/felzenszwalb_segmentations_uint16`, next to the official uint8 key).

    python scripts/generate_fh_masks.py \
      --train_directory=imagenet/train --validation_directory=imagenet/val \
      --output_directory=imagenet-fh

Input: DIR/<class>/<image> (labels 1..N in --labels_file order, default sorted folder names) or a
flat folder of images (label 0 = unlabelled).  Split the work over machines with a job array:
`--num_tasks=8 --task_index=$SLURM_ARRAY_TASK_ID` (every task needs the same other flags).
Interrupted?  Run the same command again: complete shards are kept, the rest are written.
`--region_priors` adds DETReg's selective-search regions to every record (schema.REGION_*).
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging

from detcon import cli
from detcon.data import schema, shards
from detcon.data.build import image_folder, mask_job

_TRAIN_DIRECTORY = flags.DEFINE_string(
    "train_directory", None, "Training images: DIR/<class>/<image> or a flat folder."
)
_VALIDATION_DIRECTORY = flags.DEFINE_string(
    "validation_directory", None, "Validation images, same layout."
)
_OUTPUT_DIRECTORY = flags.DEFINE_string("output_directory", None, "Where the shards are written.")
_OFFICIAL_SHARDS = {"train": 2048, "validation": 256}
_TRAIN_SHARDS = flags.DEFINE_integer(
    "train_shards",
    None,
    "Number of train shards (official: 2048). Default: 2048, or fewer for small folders (at "
    f"least {mask_job.MIN_IMAGES_PER_SHARD} images per shard); a given value is used as is.",
)
_VALIDATION_SHARDS = flags.DEFINE_integer(
    "validation_shards",
    None,
    "Number of validation shards (official: 256). Default: 256, or fewer for small folders.",
)
_FH_SCALES = flags.DEFINE_string(
    "fh_scales", "1000", "Comma-separated FH scales, one mask per scale."
)
_FH_MIN_SIZES = flags.DEFINE_string(
    "fh_min_sizes", "1000", "Comma-separated FH minimum segment sizes, one per scale."
)
_REGION_PRIORS = flags.DEFINE_boolean(
    "region_priors",
    False,
    "Also store DETReg's region priors: every region of OpenCV-style fast selective search "
    "(box and hierarchy level), for --config=configs/detreg.py (~0.3-0.5 s more per image).",
)
_LABELS_FILE = flags.DEFINE_string(
    "labels_file",
    None,
    "One class folder name per line (label = line number, from 1); default: sorted folder names.",
)
_METADATA_FILE = flags.DEFINE_string(
    "imagenet_metadata_file",
    None,
    "Optional '<class folder>\\t<text>' lines, for image/class/text.",
)
_NUM_WORKERS = flags.DEFINE_integer(
    "num_workers",
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
    "Worker processes, default all usable cores (1: run in this process).",
)
_TASK_INDEX = flags.DEFINE_integer(
    "task_index", 0, "This machine's index in a job array, in [0, num_tasks)."
)
_NUM_TASKS = flags.DEFINE_integer("num_tasks", 1, "Number of machines sharing the shards.")
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seed of the file-order shuffle (must match across tasks and re-runs)."
)
_PROGRESS = flags.DEFINE_boolean("progress", True, "Show a progress bar with rate and ETA.")
flags.DEFINE_alias("num_threads", "num_workers")  # the official script's name for it


def _parse_list(flag: flags.FlagHolder, kind: type) -> tuple:
    try:
        return tuple(kind(v) for v in flag.value.split(",") if v.strip())
    except ValueError:
        raise app.UsageError(
            f"--{flag.name}={flag.value!r} must be comma-separated numbers"
        ) from None


def _exit_on_sigterm(signal_number: int, frame: object) -> None:
    # SystemExit unwinds: partial shards are deleted and the worker pool is shut down.
    del frame
    raise SystemExit(128 + signal_number)


def _training_classes(listings: dict) -> list[str] | None:
    """The train split's label map: this run's listing, else the output's train manifest."""
    if "train" in listings:
        return listings["train"].classes
    manifest = (
        shards.read_manifest(_OUTPUT_DIRECTORY.value, "train")
        if os.path.isdir(_OUTPUT_DIRECTORY.value)
        else None
    )
    return None if manifest is None else manifest.get("classes")


@cli.one_line_usage_errors
def main(argv: list[str]) -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _OUTPUT_DIRECTORY.value:
        raise app.UsageError("--output_directory is required")
    splits = [
        (name, directory, count)
        for name, directory, count in (
            ("train", _TRAIN_DIRECTORY.value, _TRAIN_SHARDS.value),
            ("validation", _VALIDATION_DIRECTORY.value, _VALIDATION_SHARDS.value),
        )
        if directory
    ]
    if not splits:
        raise app.UsageError("give --train_directory and/or --validation_directory")
    if _NUM_WORKERS.value < 1:
        raise app.UsageError(f"--num_workers must be >= 1, got {_NUM_WORKERS.value}")
    try:
        params = mask_job.FhParams(
            _parse_list(_FH_SCALES, float),
            _parse_list(_FH_MIN_SIZES, int),
            region_priors=_REGION_PRIORS.value,
        )
        mask_job.task_shards(1, _TASK_INDEX.value, _NUM_TASKS.value)
    except ValueError as error:
        raise app.UsageError(str(error)) from None

    summaries = []
    listings = {}
    for name, directory, num_shards in splits:
        # Validation labels follow the training label map, so a class has one label in both.
        classes = _training_classes(listings) if name == "validation" else None
        if name == "validation" and classes is None and not _LABELS_FILE.value:
            logging.warning(
                "validation: no training classes known (no --train_directory, no train manifest "
                "in --output_directory, no --labels_file); labelling by its own sorted folders"
            )
        try:
            listing = image_folder.list_images(
                directory, _LABELS_FILE.value, _METADATA_FILE.value, classes=classes
            )
        except (ValueError, FileNotFoundError) as error:
            raise app.UsageError(f"--{name}_directory: {error}") from None
        listings[name] = listing
        for warning in listing.warnings:
            logging.warning("%s: %s", name, warning)
        if listing.ignored_non_images:
            logging.warning(
                "%s: ignored %d files without an image extension (e.g. %s)",
                name,
                len(listing.ignored_non_images),
                listing.ignored_non_images[:3],
            )
        files = image_folder.shuffled(listing.files, _SEED.value)
        if num_shards is None:
            num_shards = mask_job.default_num_shards(len(files), _OFFICIAL_SHARDS[name])
        logging.info(
            "%s: %d images from %s into %d shards", name, len(files), directory, num_shards
        )
        try:
            summary = mask_job.generate_split(
                name,
                files,
                _OUTPUT_DIRECTORY.value,
                num_shards=num_shards,
                params=params,
                seed=_SEED.value,
                num_workers=_NUM_WORKERS.value,
                task_index=_TASK_INDEX.value,
                num_tasks=_NUM_TASKS.value,
                show_progress=_PROGRESS.value,
                classes=listing.classes,
            )
        except schema.TooManySegmentsError as error:  # the settings, not the image: stop
            cli.fail(f"{error} (completed shards are kept)", exit_code=2)
        except ValueError as error:  # settings that clash with shards already in the output
            raise app.UsageError(str(error)) from None
        summaries.append(summary)

    for summary in summaries:
        print(
            f"{summary.split}: wrote {summary.written} images in {summary.shards_written} shards, "
            f"{summary.shards_already_complete} shards already complete, "
            f"skipped {len(summary.skipped)} unreadable files"
        )
        for path, reason in summary.skipped:
            print(f"  skipped {path}: {reason}")
        for path in summary.shards_rewritten:
            print(f"  rewrote {path}: it failed verification (damaged or cut short)")


if __name__ == "__main__":
    flags.mark_flag_as_required("output_directory")
    app.run(main)
