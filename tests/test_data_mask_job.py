"""Mask generation: odd and broken inputs, FH equal to scikit-image, resume, workers, the CLI."""

import dataclasses
import hashlib
import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from skimage import data as skimage_data
from skimage.segmentation import felzenszwalb

from detcon.data import image_codec, schema, shards
from detcon.data.build import image_folder, mask_job, region_priors

_PARAMS = mask_job.FhParams(scales=(100.0,), min_sizes=(20,))
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(name: str, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    pixels = getattr(skimage_data, name)()
    image = Image.fromarray(pixels)
    return np.asarray(image.resize(size[::-1], Image.Resampling.BILINEAR))


def _write_inputs(root: str) -> dict[str, str]:
    """Writes a small ImageNet-layout folder with odd and broken files; returns expectations."""
    coffee, chelsea, astronaut = _photo("coffee"), _photo("chelsea"), _photo("astronaut")
    camera = _photo("camera")
    for folder in ("cat", "cup", "person"):
        os.makedirs(os.path.join(root, folder))
    Image.fromarray(astronaut).save(os.path.join(root, "person", "plain.JPEG"), quality=90)
    Image.fromarray(coffee).save(os.path.join(root, "cup", "png_bytes.JPEG"), format="PNG")
    Image.fromarray(coffee).convert("CMYK").save(
        os.path.join(root, "cup", "cmyk.JPEG"), format="JPEG"
    )
    Image.fromarray(camera).save(os.path.join(root, "person", "grey.jpg"))
    rgba = np.dstack([chelsea, np.full(chelsea.shape[:2], 200, np.uint8)])
    Image.fromarray(rgba).save(os.path.join(root, "cat", "rgba.png"))
    # 400 random-colour 6x6 cells give > 256 FH segments: the uint16 path, end to end.
    cells = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(cells.repeat(6, 0).repeat(6, 1)).save(os.path.join(root, "cat", "cells.png"))
    full = io.BytesIO()
    Image.fromarray(astronaut).save(full, format="JPEG")
    with open(os.path.join(root, "person", "truncated.JPEG"), "wb") as handle:
        handle.write(full.getvalue()[: len(full.getvalue()) // 2])
    with open(os.path.join(root, "cat", "text.jpg"), "w") as handle:
        handle.write("this is not an image\n")
    with open(os.path.join(root, "cat", "README.txt"), "w") as handle:
        handle.write("not an image extension: ignored, not counted as bad\n")
    return {"good": 6, "bad": {"person/truncated.JPEG", "cat/text.jpg"}}


def _generate(inputs: str, output: str, num_shards: int = 3, **kwargs) -> mask_job.SplitSummary:
    listing = image_folder.list_images(inputs)
    files = image_folder.shuffled(listing.files, seed=0)
    options = dict(
        num_shards=num_shards, params=_PARAMS, seed=0, num_workers=1, show_progress=False
    )
    options.update(kwargs)
    return mask_job.generate_split("train", files, output, **options)


def _read_records(directory: str) -> list[tf.train.Example]:
    paths = shards.list_shards(directory, "train")
    return [tf.train.Example.FromString(r.numpy()) for r in tf.data.TFRecordDataset(paths)]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    inputs, output = str(root / "images"), str(root / "shards")
    expected = _write_inputs(inputs)
    summary = _generate(inputs, output)
    return inputs, output, expected, summary


def test_bad_files_are_skipped_counted_and_odd_formats_become_rgb_jpeg(generated):
    _, output, expected, summary = generated
    assert {path for path, _ in summary.skipped} == expected["bad"]
    assert summary.written == expected["good"] and summary.shards_written == 3
    records = _read_records(output)
    assert len(records) == expected["good"]
    for record in records:
        features = record.features.feature
        encoded = features[schema.ENCODED].bytes_list.value[0]
        assert encoded[:3] == b"\xff\xd8\xff"  # JPEG, whatever the input was
        with Image.open(io.BytesIO(encoded)) as image:
            assert image.mode == "RGB"
        assert features[schema.COLORSPACE].bytes_list.value == [b"RGB"]


def test_labels_follow_sorted_class_folders(generated):
    _, output, _, _ = generated
    labels = {}
    for record in _read_records(output):
        features = record.features.feature
        labels[features[schema.FILENAME].bytes_list.value[0].decode()] = (
            features[schema.LABEL].int64_list.value[0],
            features[schema.SYNSET].bytes_list.value[0].decode(),
        )
    assert labels["rgba.png"] == (1, "cat")
    assert labels["cmyk.JPEG"] == (2, "cup")
    assert labels["grey.jpg"] == (3, "person")


def test_masks_equal_scikit_image_fh_of_the_decoded_stored_image(generated):
    _, output, _, _ = generated
    saw_wide_ids = False
    for record in _read_records(output):
        features = record.features.feature
        decoded = tf.io.decode_jpeg(
            features[schema.ENCODED].bytes_list.value[0], channels=3
        ).numpy()
        expected = felzenszwalb(decoded, scale=_PARAMS.scales[0], min_size=_PARAMS.min_sizes[0])
        stored = schema.reshape_segmentations(
            schema.parse_record(record.SerializeToString())["fh_ids"], *decoded.shape[:2]
        ).numpy()
        np.testing.assert_array_equal(stored, expected[None])
        assert features[schema.HEIGHT].int64_list.value == [decoded.shape[0]]
        saw_wide_ids |= schema.FH_SEGMENTATIONS_UINT16 in features
    assert saw_wide_ids  # the cells image must have exercised ids above 255


def test_rerun_resumes_without_rewriting_finished_shards(generated, tmp_path):
    inputs, output, _, _ = generated
    paths = shards.list_shards(output, "train")
    before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths}
    with open(paths[1], "rb") as handle:
        content = handle.read()
    os.remove(paths[1])  # as if the run had died while writing shard 1
    stale = os.path.join(output, ".train-00001-of-00003.tmp-12345")
    with open(stale, "wb") as handle:
        handle.write(b"half a shard")
    summary = _generate(inputs, output)
    assert summary.shards_already_complete == 2 and summary.shards_written == 1
    for path in (paths[0], paths[2]):
        assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == before[path]
    with open(paths[1], "rb") as handle:
        assert handle.read() == content  # deterministic: the same records in the same order
    assert shards.list_shards(output, "train") == paths  # the stale temporary file is not a shard


def test_manifest_records_each_shard_count_size_checksum_and_skips(generated):
    _, output, expected, _ = generated
    entries = mask_job.shard_entries(output, "train")
    paths = shards.list_shards(output, "train")
    assert sorted(entries) == [os.path.basename(p) for p in paths]
    for path in paths:
        entry = entries[os.path.basename(path)]
        assert entry["records"] == shards.count_records(path) == shards.recorded_count(path)
        assert entry["bytes"] == os.path.getsize(path)
        with open(path, "rb") as handle:
            assert entry["sha256"] == hashlib.sha256(handle.read()).hexdigest()
    assert sum(e["records"] for e in entries.values()) == expected["good"]
    skipped = {path for e in entries.values() for path, _ in e["skipped"]}
    assert skipped == expected["bad"]


def test_rerun_rewrites_a_damaged_shard_and_keeps_the_skip_count(generated, tmp_path, caplog):
    import logging
    import shutil

    inputs, original, expected, _ = generated
    output = str(tmp_path / "copy")
    shutil.copytree(original, output)
    paths = shards.list_shards(output, "train")
    with open(paths[2], "rb") as handle:
        content = handle.read()
    with open(paths[2], "r+b") as handle:  # a copy cut short (or a full disk)
        handle.truncate(len(content) - 7)
    with open(paths[0], "r+b") as handle:  # same size, one byte changed
        handle.seek(40)
        byte = handle.read(1)
        handle.seek(40)
        handle.write(bytes([byte[0] ^ 0xFF]))
    caplog.set_level(logging.WARNING)
    summary = _generate(inputs, output)
    assert summary.shards_rewritten == [paths[0], paths[2]]
    assert summary.shards_already_complete == 1 and summary.shards_written == 2
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert f"{paths[2]}: " in warned and "rewriting it" in warned and "checksum" in warned
    with open(paths[2], "rb") as handle:
        assert handle.read() == content
    assert {path for path, _ in summary.skipped} == expected["bad"]  # all, kept or rewritten
    summary = _generate(inputs, output)  # nothing to do: every shard verifies
    assert summary.shards_already_complete == 3 and not summary.shards_rewritten
    assert {path for path, _ in summary.skipped} == expected["bad"]


def test_default_shard_count_follows_the_input_size():
    assert mask_job.default_num_shards(19, 2048) == 1
    assert mask_job.default_num_shards(0, 2048) == 1
    assert mask_job.default_num_shards(1000, 2048) == 16  # ceil(1000 / 64)
    assert mask_job.default_num_shards(1_281_167, 2048) == 2048  # ImageNet: the official counts
    assert mask_job.default_num_shards(50_000, 256) == 256


def test_interrupted_shard_leaves_no_partial_file(generated, tmp_path, monkeypatch):
    inputs, _, _, _ = generated
    output = str(tmp_path / "interrupted")
    calls = []
    encode_file = mask_job.encode_file

    def encode_then_die(image, params):
        calls.append(image)
        if len(calls) == 6:  # inside the second shard (4 files each)
            raise KeyboardInterrupt
        return encode_file(image, params)

    monkeypatch.setattr(mask_job, "encode_file", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        _generate(inputs, output, num_shards=2)
    assert sorted(os.listdir(output)) == [
        "fh_masks_train.json",
        "fh_masks_train_counts",
        "train-00000-of-00002",
    ]
    monkeypatch.undo()
    summary = _generate(inputs, output, num_shards=2)
    assert summary.shards_already_complete == 1 and summary.shards_written == 1


def test_rerun_with_other_settings_refuses_to_mix_datasets(generated):
    inputs, output, _, _ = generated
    with pytest.raises(ValueError, match="num_shards"):
        _generate(inputs, output, num_shards=4)


def test_job_array_tasks_write_disjoint_shards_that_cover_the_split(generated, tmp_path):
    inputs, _, _, _ = generated
    output = str(tmp_path / "array")
    written = [_generate(inputs, output, num_shards=5, task_index=t, num_tasks=2) for t in range(2)]
    assert [s.shards_written for s in written] == [3, 2]
    assert len(shards.list_shards(output, "train")) == 5


def test_labels_file_orders_classes_and_metadata_names_them(generated, tmp_path):
    inputs, _, _, _ = generated
    labels_file, metadata_file = tmp_path / "labels.txt", tmp_path / "metadata.txt"
    labels_file.write_text("person\ncat\n")  # "cup" left out on purpose
    metadata_file.write_text("person\tastronaut, human\ncat\tdomestic cat\n")
    listing = image_folder.list_images(inputs, str(labels_file), str(metadata_file))
    by_class = {(f.synset, f.label, f.text) for f in listing.files}
    assert by_class == {("person", 1, "astronaut, human"), ("cat", 2, "domestic cat")}
    assert any("cup" in w and "left out" in w for w in listing.warnings)
    metadata_file.write_text("person astronaut\n")
    with pytest.raises(ValueError, match="metadata.txt:1.*tab-separated"):
        image_folder.list_images(inputs, str(labels_file), str(metadata_file))


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found in"):
        image_folder.list_images(str(tmp_path / "empty"))


def test_seeded_shuffle_is_a_real_permutation():
    files = [image_folder.ImageFile(f"/x/{i}.jpg", f"{i}.jpg", 0, "", None) for i in range(100)]
    once, again = image_folder.shuffled(files, 3), image_folder.shuffled(files, 3)
    assert (
        once == again
        and once != files
        and sorted(once, key=lambda f: int(f.relative_path[:-4])) == files
    )
    assert image_folder.shuffled(files, 4) != once


def crash_on_grey(
    image: image_folder.ImageFile, params: mask_job.FhParams
) -> mask_job.EncodeResult:
    """Encoder for the worker test: kills its process on one file, like a segfaulting decoder."""
    if image.relative_path.endswith("grey.jpg"):
        os._exit(1)
    return mask_job.encode_file(image, params)


def crash_always(image: image_folder.ImageFile, params: mask_job.FhParams) -> mask_job.EncodeResult:
    """Encoder for the worker test: a broken environment, every worker dies."""
    os._exit(1)


def test_worker_processes_keep_order_and_survive_a_crashing_file(generated):
    inputs, _, _, _ = generated
    files = image_folder.list_images(inputs).files
    in_process = list(mask_job.ordered_results(files, _PARAMS, num_workers=1))
    pooled = list(mask_job.ordered_results(files, _PARAMS, num_workers=2, encode=crash_on_grey))
    assert len(pooled) == len(files)
    for image, (record, reason), (expected, _) in zip(files, pooled, in_process, strict=True):
        if image.relative_path.endswith("grey.jpg"):
            assert record is None and "died" in reason
        else:
            assert record == expected  # same bytes as computed in this process, in input order
    # A worker that always dies is a broken setup, not bad files: stop instead of skipping them all.
    with pytest.raises(RuntimeError, match="4 files in a row"):
        list(mask_job.ordered_results(files, _PARAMS, num_workers=2, encode=crash_always))


def test_command_line_runs_over_a_flat_folder(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(_photo("coffee")).save(flat / "a.png")
    Image.fromarray(_photo("chelsea")).save(flat / "b.jpg")
    (flat / "c.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    output = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(_REPO, "scripts", "generate_fh_masks.py"),
            f"--train_directory={flat}",
            f"--validation_directory={flat}",
            f"--output_directory={output}",
            "--train_shards=2",  # given: used as is, though the default would make 1
            "--fh_scales=100",
            "--fh_min_sizes=20",
            "--num_workers=1",
            "--noprogress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "train: wrote 2 images in 2 shards" in result.stdout
    assert "validation: wrote 2 images in 1 shards" in result.stdout  # the default fits 3 files
    assert "skipped 1 unreadable files" in result.stdout and "c.jpg" in result.stdout
    labels = [
        tf.train.Example.FromString(r.numpy()).features.feature[schema.LABEL].int64_list.value[0]
        for r in tf.data.TFRecordDataset(shards.list_shards(str(output), "validation"))
    ]
    assert labels == [schema.NO_LABEL, schema.NO_LABEL]  # a flat folder has no classes


def test_bad_settings_name_the_flag():
    with pytest.raises(ValueError, match="--fh_min_sizes.*equal length"):
        mask_job.FhParams(scales=(100.0, 200.0), min_sizes=(20,))
    with pytest.raises(ValueError, match="--task_index=2"):
        mask_job.task_shards(4, task_index=2, num_tasks=2)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        image_folder.list_images("/nowhere")


def _script(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(_REPO, "scripts", "generate_fh_masks.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=_REPO),
    )


def test_validation_labels_follow_the_training_label_map(tmp_path):
    for split, classes in (("train", ("ant", "bee", "cat")), ("val", ("bee", "cat"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(_photo("coffee", (16, 16))).save(tmp_path / split / name / "x.png")
    output = tmp_path / "out"
    result = _script(
        f"--train_directory={tmp_path / 'train'}",
        f"--validation_directory={tmp_path / 'val'}",
        f"--output_directory={output}",
        "--train_shards=1",
        "--validation_shards=1",
        "--num_workers=1",
        "--noprogress",
    )
    assert result.returncode == 0, result.stderr
    examples = [
        tf.train.Example.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(shards.list_shards(str(output), "validation"))
    ]
    labels = {
        e.features.feature[schema.SYNSET].bytes_list.value[0].decode(): e.features.feature[
            schema.LABEL
        ].int64_list.value[0]
        for e in examples
    }
    assert labels == {"bee": 2, "cat": 3}  # the training map; per-folder labels would be 1, 2
    assert shards.read_manifest(str(output), "train")["num_classes"] == 3


def test_more_than_65535_segments_stops_with_exit_code_2(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    (tmp_path / "flat").mkdir()
    Image.fromarray(noise).save(tmp_path / "flat" / "noise.png")
    files = image_folder.list_images(str(tmp_path / "flat")).files
    tiny_segments = mask_job.FhParams(scales=(0.01,), min_sizes=(0,))
    with pytest.raises(schema.TooManySegmentsError):
        mask_job.generate_split(
            "train",
            files,
            str(tmp_path / "direct"),
            num_shards=1,
            params=tiny_segments,
            seed=0,
            num_workers=1,
            show_progress=False,
        )
    result = _script(
        f"--train_directory={tmp_path / 'flat'}",
        f"--output_directory={tmp_path / 'out'}",
        "--train_shards=1",
        "--fh_scales=0.01",
        "--fh_min_sizes=0",
        "--num_workers=1",
        "--noprogress",
    )
    assert result.returncode == 2, result.stderr
    assert "segment ids must lie in [0, 65535]" in result.stderr
    assert "Traceback" not in result.stderr


def test_rerun_removes_temporary_files_of_a_killed_run(generated, tmp_path):
    inputs = generated[0]
    output = tmp_path / "out"
    output.mkdir()
    stale_shard = output / ".train-00001-of-00002.tmp-999999"
    stale_manifest = output / "fh_masks_train.json.tmp-999999"
    stale_shard.write_bytes(b"partial")
    stale_manifest.write_text("{")
    summary = _generate(inputs, str(output), num_shards=2)
    assert summary.shards_written == 2
    assert not stale_shard.exists() and not stale_manifest.exists()
    assert sorted(os.listdir(output)) == [
        "fh_masks_train.json",
        "fh_masks_train_counts",
        "train-00000-of-00002",
        "train-00001-of-00002",
    ]


_POOL_PROGRAM = """
import os, sys, time
from detcon.data.build import mask_job
pool = mask_job._new_pool(2)
pids = {f.result() for f in [pool.submit(os.getpid) for _ in range(8)]}
print(" ".join(map(str, sorted(pids))), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"  # a zombie has already exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_workers_die_with_a_killed_parent():
    parent = subprocess.Popen(
        [sys.executable, "-c", _POOL_PROGRAM],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=_REPO),
    )
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert workers and all(_alive(p) for p in workers)
    finally:
        parent.kill()  # kill -9: no cleanup code runs in the parent
        parent.wait()
    for _ in range(300):  # the forkserver notices its parent's death, then the workers die
        if not any(_alive(p) for p in workers):
            break
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), workers


def test_region_priors_flag_stores_every_records_regions_and_guards_the_output(generated, tmp_path):
    inputs, output, expected, _ = generated
    params = dataclasses.replace(_PARAMS, region_priors=True)
    priors = str(tmp_path / "priors")
    _generate(inputs, priors, num_shards=1, params=params)
    assert shards.read_manifest(priors, "train")["region_priors"] is True
    paths = shards.list_shards(priors, "train")
    records = list(tf.data.TFRecordDataset(paths).as_numpy_iterator())
    assert len(records) == expected["good"]
    for serialized in records:
        assert schema.has_region_priors(serialized)
        parsed = schema.parse_record(tf.constant(serialized), with_regions=True)
        pixels = image_codec.decode_rgb(parsed["encoded"]).numpy()
        want = region_priors.selective_search(pixels)
        np.testing.assert_array_equal(parsed["region_boxes"].numpy(), want.boxes)
        np.testing.assert_array_equal(parsed["region_levels"].numpy(), want.levels)
    # The default run wrote none; resuming it with the flag would mix records with and without.
    assert not any(map(schema.has_region_priors, _read_records_bytes(output)))
    with pytest.raises(ValueError, match="region_priors"):
        _generate(inputs, output, params=params)


def _read_records_bytes(directory: str) -> list[bytes]:
    paths = shards.list_shards(directory, "train")
    return list(tf.data.TFRecordDataset(paths).as_numpy_iterator())
