"""tf.data pipeline: batch layout, determinism, resume, per-process sharding, evaluation, errors."""

import os

import numpy as np
import pytest
import tensorflow as tf

from detcon.data import image_codec, pipeline, schema, shards, views
from detcon.data.build import fh_records

_H, _W, _S = 24, 32, 16


def _write_dataset(directory: str, split: str, num_shards: int, per_shard: int) -> None:
    """Writes tiny records; record i has label i + 1 and mask ids 10 * i .. 10 * i + 3."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    index = 0
    for shard in range(num_shards):
        with fh_records.atomic_shard(
            os.path.join(directory, shards.shard_name(split, shard, num_shards))
        ) as writer:
            for _ in range(per_shard):
                pixels = rng.integers(0, 256, (_H, _W, 3), dtype=np.uint8)
                quadrant = (np.arange(_H)[:, None] >= _H // 2) * 2 + (
                    np.arange(_W)[None] >= _W // 2
                )
                example = schema.build_example(
                    jpeg=image_codec.encode_jpeg(pixels),
                    height=_H,
                    width=_W,
                    segmentations=(10 * index + quadrant)[None],
                    filename=f"{index}.jpg",
                    label=index + 1,
                )
                writer.write(example.SerializeToString())
                index += 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("pipeline"))
    _write_dataset(directory, "train", num_shards=4, per_shard=3)
    _write_dataset(directory, "validation", num_shards=1, per_shard=5)
    return directory


def _batches(directory: str, count: int, **kwargs) -> list[dict[str, np.ndarray]]:
    options = dict(
        image_size=_S, local_devices=2, per_device_batch=2, deterministic=True, shuffle_buffer=8
    )
    options.update(kwargs)
    iterator = pipeline.pretrain_batches(directory, **options)
    return [next(iterator) for _ in range(count)]


def test_pretrain_batches_have_the_contract_shapes_dtypes_and_ranges(dataset):
    (batch,) = _batches(dataset, 1, local_devices=2, per_device_batch=3)
    assert set(batch) == {"view1", "view2", "fh_mask1", "fh_mask2", "folded_segments", "label"}
    for view in ("view1", "view2"):
        assert batch[view].shape == (2, 3, _S, _S, 3) and batch[view].dtype == np.float32
        assert 0.0 <= batch[view].min() and batch[view].max() <= 1.0 and batch[view].std() > 0.05
    for mask in ("fh_mask1", "fh_mask2"):
        assert batch[mask].shape == (2, 3, _S, _S) and batch[mask].dtype == np.int32
    assert batch["label"].shape == (2, 3) and batch["label"].dtype == np.int32
    # Record i holds ids 10 i .. 10 i + 3; each view renumbers the ones it shows 0..K-1 in
    # order of first appearance.
    for mask in ("fh_mask1", "fh_mask2"):
        for ids in batch[mask].reshape(-1, _S * _S):
            values, first = np.unique(ids, return_index=True)
            assert values.tolist() == list(range(len(values))) and len(values) <= 4
            assert (np.diff(first) > 0).all()
    assert batch["folded_segments"].shape == (2, 3) and batch["folded_segments"].dtype == np.int32
    np.testing.assert_array_equal(batch["folded_segments"], 0)
    assert not np.array_equal(batch["view1"], batch["view2"])  # two different augmentations


def test_deterministic_mode_repeats_exactly_and_the_seed_matters(dataset):
    first, again = _batches(dataset, 4), _batches(dataset, 4)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = _batches(dataset, 4, seed=1)
    assert any(
        not np.array_equal(a["view1"], b["view1"]) for a, b in zip(first, other, strict=True)
    )


def test_start_step_resumes_the_same_stream_across_an_epoch_boundary(dataset):
    full = _batches(dataset, 5)  # 12 records per epoch, 4 per batch: batch 3 starts epoch 1
    for start in (2, 4):
        resumed = _batches(dataset, 5 - start, start_step=start)
        for a, b in zip(full[start:], resumed, strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_each_epoch_is_a_fresh_permutation_of_the_data(dataset):
    labels = np.concatenate([b["label"].ravel() for b in _batches(dataset, 6)])  # two epochs
    epoch0, epoch1 = labels[:12], labels[12:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert not np.array_equal(epoch0, epoch1)


@pytest.mark.parametrize("num_shards,process_count", [(4, 2), (1, 3)])
def test_processes_read_disjoint_parts_that_cover_the_dataset(tmp_path, num_shards, process_count):
    directory = str(tmp_path)
    _write_dataset(directory, "train", num_shards=num_shards, per_shard=12 // num_shards)
    per_process = 12 // process_count
    seen = []
    for process in range(process_count):
        batches = _batches(
            directory,
            per_process // 2,
            local_devices=1,
            per_device_batch=2,
            process_index=process,
            process_count=process_count,
        )
        labels = np.concatenate([b["label"].ravel() for b in batches])  # exactly one epoch
        assert len(set(labels)) == per_process
        seen.append(set(labels))
    assert set().union(*seen) == set(range(12))
    assert sum(len(s) for s in seen) == 12


def test_split_for_process_gives_disjoint_covering_files():
    paths = [f"f{i}" for i in range(7)]
    parts = [pipeline.split_for_process(paths, p, 3) for p in range(3)]
    assert all(not example_level for _, example_level in parts)
    assert sorted(sum((files for files, _ in parts), [])) == paths
    files, example_level = pipeline.split_for_process(paths[:2], 2, 3)
    assert example_level and files == paths[:2]


def test_eval_batches_cover_every_record_once_padded_to_equal_length(dataset):
    per_process = []
    for process in range(2):
        batches = list(
            pipeline.eval_batches(
                dataset,
                image_size=_S,
                local_devices=1,
                per_device_batch=2,
                process_index=process,
                process_count=2,
            )
        )
        for batch in batches:
            assert batch["image"].shape == (1, 2, _S, _S, 3) and batch["image"].dtype == np.float32
            assert batch["label"].dtype == np.int32
        per_process.append(np.concatenate([b["label"].ravel() for b in batches]))
    assert (
        len(per_process[0]) == len(per_process[1]) == 4
    )  # 5 records: 3 and 2, padded to 2 batches
    labels = np.concatenate(per_process)
    assert sorted(labels[labels >= 0]) == list(range(5)) and (labels == -1).sum() == 3


def test_missing_or_incomplete_datasets_fail_with_the_fix(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="nope.*generate_fh_masks.py --train_directory"):
        pipeline.list_shards(str(tmp_path / "nope"), "train")
    with pytest.raises(FileNotFoundError, match="nope"):  # at the call, before any next()
        pipeline.pretrain_batches(
            str(tmp_path / "nope"), image_size=8, local_devices=1, per_device_batch=1
        )
    with pytest.raises(FileNotFoundError, match="no 'train' shards.*generate_fh_masks.py"):
        pipeline.list_shards(str(tmp_path), "train")
    partial = tmp_path / "partial"
    _write_dataset(str(partial), "train", num_shards=3, per_shard=1)
    os.remove(partial / shards.shard_name("train", 1, 3))
    with pytest.raises(FileNotFoundError, match="2 of 3.*re-run"):
        pipeline.list_shards(str(partial), "train")
    with pytest.raises(tf.errors.InvalidArgumentError, match="fh_mask_index=1"):
        _batches(dataset, 1, fh_mask_index=1)


def test_count_records_reads_headers_only(dataset):
    assert pipeline.num_examples(dataset, "train") == 12
    assert [shards.count_records(p) for p in pipeline.list_shards(dataset, "validation")] == [5]


def _write_many_segments(directory: str, height: int, width: int, num_records: int) -> None:
    """Writes records whose every pixel is its own segment, numbered in raster order."""
    rng = np.random.default_rng(2)
    ids = np.arange(height * width, dtype=np.int64).reshape(height, width)
    with fh_records.atomic_shard(os.path.join(directory, shards.shard_name("train", 0, 1))) as w:
        for index in range(num_records):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            example = schema.build_example(
                jpeg=image_codec.encode_jpeg(pixels),
                height=height,
                width=width,
                segmentations=ids[None],
                filename=f"{index}.jpg",
                label=index + 1,
            )
            w.write(example.SerializeToString())


def test_segments_beyond_max_mask_id_keep_every_pixel(tmp_path):
    # 48 x 64 one-pixel segments: ids up to 3071, and a 32 x 32 view shows up to 1024 of them.
    _write_many_segments(str(tmp_path), 48, 64, num_records=4)
    options = dict(
        image_size=32, local_devices=1, per_device_batch=4, deterministic=True, shuffle_buffer=4
    )
    (batch,) = _batches(str(tmp_path), 1, **options)
    folded = batch["folded_segments"][0]
    for mask in ("fh_mask1", "fh_mask2"):
        ids = batch[mask][0].reshape(4, -1)
        # Every pixel keeps a usable id: none is >= 256, so the device drops nothing.
        assert ids.min() >= 0 and ids.max() <= 255
    for b in range(4):
        counts = []
        for mask in ("fh_mask1", "fh_mask2"):
            ids = batch[mask][0, b].ravel()
            values, first = np.unique(ids, return_index=True)
            assert values.tolist() == list(range(len(values)))
            assert (np.diff(first) > 0).all()  # numbered by first appearance
            counts.append(len(values))
        # A view of K > 256 segments keeps 255 of them and folds K - 255 into id 255, whose
        # pixels then number at least K - 255: one pixel per segment here.
        pixels_in_last = sum(int((batch[m][0, b] == 255).sum()) for m in ("fh_mask1", "fh_mask2"))
        assert pixels_in_last >= folded[b] + sum(c == 256 for c in counts)
    assert folded.max() > 0  # the 32 x 32 views here hold more than 256 segments

    # With no more segments than max_mask_id in a view, nothing folds and ids stay distinct.
    (small,) = _batches(str(tmp_path), 1, **dict(options, image_size=16))
    np.testing.assert_array_equal(small["folded_segments"], 0)
    for mask in ("fh_mask1", "fh_mask2"):
        for ids in small[mask][0].reshape(4, -1):
            assert np.unique(ids).size == ids.max() + 1


def test_mask_free_batches_equal_the_masked_views_and_need_no_masks(tmp_path, dataset):
    """with_masks=False (BYOL, SimCLR) gives the same views, and reads records without masks."""
    masked = _batches(dataset, 2)
    plain = _batches(dataset, 2, with_masks=False)
    for a, b in zip(masked, plain, strict=True):
        assert set(b) == {"view1", "view2", "label"}
        for key in b:
            np.testing.assert_array_equal(a[key], b[key])
    directory = str(tmp_path / "no_masks")
    os.makedirs(directory)
    rng = np.random.default_rng(1)
    with fh_records.atomic_shard(
        os.path.join(directory, shards.shard_name("train", 0, 1))
    ) as writer:
        for index in range(4):
            example = schema.build_example(
                jpeg=image_codec.encode_jpeg(rng.integers(0, 256, (_H, _W, 3), dtype=np.uint8)),
                height=_H,
                width=_W,
                segmentations=np.zeros((1, _H, _W), np.int32),
                filename=f"{index}.jpg",
                label=index + 1,
            )
            del example.features.feature[schema.FH_SEGMENTATIONS]
            writer.write(example.SerializeToString())
    (batch,) = _batches(directory, 1, with_masks=False, local_devices=1)
    assert batch["view1"].shape == (1, 2, _S, _S, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="regenerate the shards"):
        _batches(directory, 1, local_devices=1)


def test_detco_jigsaw_crops_are_extra_views_of_at_least_sixty_percent():
    rng = np.random.default_rng(0)
    image = tf.constant(rng.integers(0, 256, (90, 120, 3)), tf.uint8)
    example = {"image": image, "label": tf.constant(0, tf.int32)}
    seed = tf.constant([5, 9], tf.int64)
    plain = pipeline.two_views(example, 32, 0, seed, crop_sampler="torchvision")
    with_jigsaw = pipeline.two_views(
        example, 32, 0, seed, crop_sampler="torchvision", jigsaw_size=129
    )
    # The views are those of a run without jigsaw crops; the crops are their own draws.
    for key in ("view1", "view2"):
        np.testing.assert_array_equal(plain[key].numpy(), with_jigsaw[key].numpy())
    assert with_jigsaw["jigsaw1"].shape == (129, 129, 3) == with_jigsaw["jigsaw2"].shape
    assert not np.array_equal(with_jigsaw["jigsaw1"].numpy(), with_jigsaw["jigsaw2"].numpy())
    # Their windows: RandomResizedCrop(scale=(0.6, 1)) through the same window function.
    for index in range(100):
        _, size = views.random_crop_window(
            tf.shape(image),
            tf.constant([index, 3], tf.int64),
            area_range=pipeline.JIGSAW_AREA_RANGE,
            sampler="torchvision",
        )
        assert size.numpy().prod() >= 0.6 * 90 * 120 - 120  # up to rounding of the sides
