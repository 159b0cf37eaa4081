"""Writes one split's FH-mask shards with worker processes: resumable, shardable over machines.

Each shard holds a contiguous slice of the seeded shuffle of the input files and is written under a
temporary name, then renamed; a re-run skips shards that exist.  A manifest next to the shards
(`fh_masks_<split>.json`) records the arguments and input listing so a re-run with different ones
fails instead of mixing two datasets.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import glob
import json
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tqdm

from detcon.data import image_codec, schema, shards
from detcon.data.build import fh_records, image_folder

MANIFEST_VERSION = 1
_IN_FLIGHT_PER_WORKER = 4  # enough queued work to hide IPC, little enough to bound memory

EncodeResult = tuple[bytes | None, str]  # (serialized record, "") or (None, reason skipped)


@dataclasses.dataclass(frozen=True)
class FhParams:
    """FH parameters, one (scale, min_size) pair per stored segmentation; and whether records
    also get DETReg's region priors (selective search, detcon/data/build/region_priors.py)."""

    scales: tuple[float, ...]
    min_sizes: tuple[int, ...]
    region_priors: bool = False

    def __post_init__(self) -> None:
        if not self.scales or len(self.scales) != len(self.min_sizes):
            raise ValueError(
                f"--fh_scales {list(self.scales)} and --fh_min_sizes {list(self.min_sizes)} "
                "must be non-empty and of equal length (one min size per scale)"
            )
        if min(self.scales) <= 0 or min(self.min_sizes) < 0:
            raise ValueError("--fh_scales must be > 0 and --fh_min_sizes >= 0")


@dataclasses.dataclass
class SplitSummary:
    """What one run did for one split."""

    split: str
    written: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    shards_written: int = 0
    shards_already_complete: int = 0
    shards_rewritten: list[str] = dataclasses.field(default_factory=list)  # failed verification


def shard_bounds(num_files: int, num_shards: int) -> list[tuple[int, int]]:
    """Returns the [start, end) file range of each shard: near-equal contiguous slices."""
    edges = np.linspace(0, num_files, num_shards + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def task_shards(num_shards: int, task_index: int, num_tasks: int) -> list[int]:
    """Returns the shards task `task_index` of `num_tasks` writes (strided, disjoint)."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"--task_index={task_index} must lie in [0, --num_tasks={num_tasks})")
    return list(range(task_index, num_shards, num_tasks))


def encode_file(image: image_folder.ImageFile, params: FhParams) -> EncodeResult:
    """Returns (record, "") for one input file, or (None, reason) when it must be skipped."""
    try:
        with open(image.path, "rb") as handle:
            data = handle.read()
        record = fh_records.encode_record(
            data,
            filename=os.path.basename(image.path),
            label=image.label,
            synset=image.synset,
            text=image.text,
            scales=params.scales,
            min_sizes=params.min_sizes,
            with_region_priors=params.region_priors,
        )
        return record, ""
    except schema.TooManySegmentsError:
        raise  # the FH settings, not this image: every later image would fail the same way
    except image_codec.BadImageError as error:
        return None, str(error)
    except OSError as error:
        return None, f"cannot read file: {error}"
    except Exception as error:
        return None, f"unexpected {type(error).__name__}: {error}"


def _die_with(main_pid: int) -> None:
    """Starts a thread that SIGKILLs this worker once process `main_pid` has exited."""

    def watch() -> None:
        try:
            descriptor = os.pidfd_open(main_pid)  # readable once the process exits (Linux 5.3+)
            select.select([descriptor], [], [])
        except (AttributeError, OSError):
            while _pid_alive(main_pid):
                time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-main-process", daemon=True).start()


def _init_worker(main_pid: int) -> None:
    # Without this a killed run leaves its workers (~1.3 GB each) waiting for work forever. Their
    # parent is the forkserver, which itself waits for them (they hold its liveness pipe), so a
    # parent-death signal would never fire: each worker watches the main process instead.
    _die_with(main_pid)
    # One thread per process: parallelism comes from the processes, oversubscription only hurts.
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # runtime already initialised by an import; the defaults then apply


Encoder = Callable[[image_folder.ImageFile, FhParams], EncodeResult]


def _new_pool(num_workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """Returns a process pool whose workers start fast and never inherit a running TensorFlow."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        # The server imports TensorFlow and scikit-image once (no TF runtime started yet), so a new
        # worker is a cheap fork of it instead of a multi-second fresh import.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["detcon.data.build.mask_job"])
    else:
        context = multiprocessing.get_context("spawn")
    return concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),)
    )


_DIED = "the worker process died on this file (crashed or killed, e.g. out of memory)"
_MAX_DEATHS_IN_A_ROW = 3  # more than this is a broken environment, not a few bad files


def _isolate(
    images: Sequence[image_folder.ImageFile], params: FhParams, encode: Encoder
) -> Iterator[EncodeResult]:
    """Yields results after a worker died, one file at a time, so only the culprit is skipped."""
    pool = _new_pool(1)
    deaths_in_a_row = 0
    try:
        for image in images:
            try:
                result = pool.submit(encode, image, params).result()
                deaths_in_a_row = 0
            except concurrent.futures.process.BrokenProcessPool:
                deaths_in_a_row += 1
                if deaths_in_a_row > _MAX_DEATHS_IN_A_ROW:
                    raise RuntimeError(
                        f"worker processes died on {deaths_in_a_row} files in a row "
                        f"(last: {image.path}); "
                        "that is not a bad file but a broken worker: see the error above (out of "
                        "memory? a script without `if __name__ == '__main__':`?). Completed shards "
                        "are kept; fix it and re-run the same command to resume"
                    ) from None
                result = (None, _DIED)
                pool.shutdown(wait=True)
                pool = _new_pool(1)
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ordered_results(
    images: Sequence[image_folder.ImageFile],
    params: FhParams,
    num_workers: int,
    encode: Encoder | None = None,
) -> Iterator[EncodeResult]:
    """Yields `encode(image)` (default `encode_file`) for each image, in order.

    The work runs in `num_workers` processes (1: in this process); a worker that dies costs only
    the file it was on, which is reported as skipped.
    """
    encode = encode or encode_file
    if num_workers <= 1:
        for image in images:
            yield encode(image, params)
        return
    position = 0
    while position < len(images):
        pool = _new_pool(num_workers)
        pending: collections.deque = collections.deque()
        submitted = position
        try:
            while position < len(images):
                while (
                    submitted < len(images) and len(pending) < _IN_FLIGHT_PER_WORKER * num_workers
                ):
                    pending.append(pool.submit(encode, images[submitted], params))
                    submitted += 1
                result = pending[0].result()
                pending.popleft()
                position += 1
                yield result
        except concurrent.futures.process.BrokenProcessPool:
            logging.warning(
                "a worker process died; re-running its %d unfinished files one at a time",
                len(pending),
            )
            # Results that finished before the crash are kept; the rest run again in isolation.
            for future in pending:
                done = future.done() and not future.cancelled() and future.exception() is None
                if not done:
                    break
                position += 1
                yield future.result()
            retry = images[position:submitted]
            for result in _isolate(retry, params, encode):
                position += 1
                yield result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _manifest(
    split: str,
    files: list[image_folder.ImageFile],
    num_shards: int,
    params: FhParams,
    seed: int,
    classes: list[str],
) -> dict:
    return {
        "version": MANIFEST_VERSION,
        "split": split,
        "num_files": len(files),
        "num_classes": len(classes),
        "classes": list(classes),
        "files_digest": image_folder.listing_digest(files),
        "num_shards": num_shards,
        "fh_scales": list(params.scales),
        "fh_min_sizes": list(params.min_sizes),
        "region_priors": params.region_priors,
        "seed": seed,
    }


manifest_path = shards.manifest_path


def _check_or_write_manifest(output_directory: str, manifest: dict) -> None:
    """Writes the manifest, or checks a previous run's one matches so shards are never mixed."""
    split = manifest["split"]
    path = manifest_path(output_directory, split)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            previous = json.load(handle)
        previous.setdefault("region_priors", False)  # written before region priors existed
        # A key an older version did not write is derived from the inputs the digest covers.
        differing = sorted(k for k in manifest if k in previous and previous[k] != manifest[k])
        if differing:
            raise ValueError(
                f"{output_directory!r} already holds {split!r} shards made with different "
                f"settings or input files (differs in: {', '.join(differing)}; see {path}). "
                "Re-run with the same arguments and inputs to resume, or use a new "
                "--output_directory"
            )
        return
    existing = [
        n for n in os.listdir(output_directory) if n.startswith(f"{split}-") and "-of-" in n
    ]
    if existing:
        raise ValueError(
            f"{output_directory!r} holds {split!r} shards (e.g. {existing[0]}) but no "
            f"{os.path.basename(path)}, "
            "so they were not made by this tool with these arguments; use a new --output_directory"
        )
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
    os.replace(temporary, path)


# Images per shard below which the default shard count shrinks (the official 2048 train and 256
# validation shards hold ~625 and ~195 ImageNet images): small folders get a few full shards.
MIN_IMAGES_PER_SHARD = 64


def default_num_shards(num_files: int, official: int) -> int:
    """The official shard count, or fewer for small inputs: at least MIN_IMAGES_PER_SHARD images
    per shard (1 shard for 19 images, 2048 for ImageNet's train split)."""
    return max(1, min(official, -(-num_files // MIN_IMAGES_PER_SHARD)))


@contextlib.contextmanager
def _manifest_locked(output_directory: str, split: str) -> Iterator[dict]:
    """Yields the split's manifest for changes, under an exclusive lock (tasks share it), and
    writes it back atomically."""
    path = manifest_path(output_directory, split)
    # The lock is on the directory itself: no lock file is left among the shards.
    lock = os.open(output_directory, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        yield manifest
        temporary = f"{path}.tmp-{os.getpid()}"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        os.close(lock)  # releases the lock


def record_shard(
    output_directory: str, split: str, path: str, records: int, skipped: list[tuple[str, str]]
) -> None:
    """Adds a finished shard's record count, size, SHA-256 and skipped files to the manifest."""
    entry = {
        "records": records,
        "bytes": os.path.getsize(path),
        "sha256": shards.file_digest(path),
        "skipped": [list(item) for item in skipped],
    }
    with _manifest_locked(output_directory, split) as manifest:
        manifest.setdefault("shards", {})[os.path.basename(path)] = entry


def shard_entries(output_directory: str, split: str) -> dict[str, dict]:
    """The manifest's per-shard entries ({} for shards written by an older version)."""
    return (shards.read_manifest(output_directory, split) or {}).get("shards", {})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(output_directory: str, split: str, shard_paths: list[str]) -> int:
    """Returns how many partial files of a killed run it deleted (for `shard_paths`, manifests)."""
    stale = []
    for path in shard_paths:  # tasks own disjoint shards, so these are never another's live work
        directory, name = os.path.split(path)
        stale += glob.glob(os.path.join(glob.escape(directory), f".{glob.escape(name)}.tmp-*"))
    for draft in glob.glob(glob.escape(manifest_path(output_directory, split)) + ".tmp-*"):
        pid = draft.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            stale.append(draft)
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    if stale:
        logging.info("%s: removed %d temporary files left by an interrupted run", split, len(stale))
    return len(stale)


def generate_split(
    split: str,
    files: list[image_folder.ImageFile],
    output_directory: str,
    *,
    num_shards: int,
    params: FhParams,
    seed: int,
    num_workers: int,
    task_index: int = 0,
    num_tasks: int = 1,
    show_progress: bool = True,
    classes: list[str] | None = None,
) -> SplitSummary:
    """Writes this task's missing shards of `split` from `files` (shuffled); returns a summary.

    `classes` (label i + 1 = classes[i]; default: from the files) go into the manifest, where
    training takes its class count from.
    """
    if num_shards < 1:
        raise ValueError(f"--{split}_shards must be >= 1, got {num_shards}")
    os.makedirs(output_directory, exist_ok=True)
    if classes is None:
        names = {f.label: f.synset for f in files if f.label > 0}
        classes = [names.get(label, "") for label in range(1, max(names, default=0) + 1)]
    _check_or_write_manifest(
        output_directory, _manifest(split, files, num_shards, params, seed, classes)
    )
    if num_shards > len(files):
        logging.warning(
            "%s: %d shards for %d images; %d shards will be empty",
            split,
            num_shards,
            len(files),
            num_shards - len(files),
        )
    bounds = shard_bounds(len(files), num_shards)
    summary = SplitSummary(split)
    entries = shard_entries(output_directory, split)
    todo = []
    for index in task_shards(num_shards, task_index, num_tasks):
        path = os.path.join(output_directory, shards.shard_name(split, index, num_shards))
        entry = entries.get(os.path.basename(path))
        problem = shards.shard_problem(path, entry) if os.path.exists(path) else None
        if os.path.exists(path) and problem is None:
            summary.shards_already_complete += 1
            summary.skipped += [tuple(item) for item in (entry or {}).get("skipped", [])]
            continue
        if problem is not None:  # cut short by a copy or a full disk: write it again
            logging.warning("%s: %s; rewriting it", path, problem)
            summary.shards_rewritten.append(path)
            os.remove(path)
        todo.append((path, bounds[index]))
    remove_stale_temporaries(output_directory, split, [path for path, _ in todo])
    if summary.shards_already_complete:
        logging.info(
            "%s: %d shards already complete, skipping them", split, summary.shards_already_complete
        )
    images = [files[i] for _, (start, end) in todo for i in range(start, end)]
    results = ordered_results(images, params, num_workers)
    progress = tqdm.tqdm(
        total=len(images),
        desc=split,
        unit="img",
        disable=not (show_progress and images),
        smoothing=0.05,
    )
    try:
        for path, (start, end) in todo:
            in_shard = 0
            skipped_here: list[tuple[str, str]] = []
            with fh_records.atomic_shard(path) as writer:
                for image in files[start:end]:
                    record, reason = next(results)
                    if record is None:
                        skipped_here.append((image.relative_path, reason))
                        summary.skipped.append((image.relative_path, reason))
                        logging.warning("skipping %s: %s", image.path, reason)
                    else:
                        writer.write(record)
                        summary.written += 1
                        in_shard += 1
                    progress.update(1)
                    progress.set_postfix(skipped=len(summary.skipped), refresh=False)
            shards.write_record_count(path, in_shard)
            record_shard(output_directory, split, path, in_shard, skipped_here)
            summary.shards_written += 1
    finally:
        progress.close()
        results.close()
    return summary
