"""DETReg data: region priors in records, per-sample rank draws, the canvas batches, clear errors."""

import os

import numpy as np
import pytest
import tensorflow as tf

from detcon import errors
from detcon.data import detreg_views, image_codec, pipeline, schema, shards
from detcon.data.build import fh_records
from detcon.data.build import region_priors as rp

_H, _W, _S, _K = 60, 90, 48, 5
# The white rectangle every record shows, and the priors every record stores (xyxy pixels).
_RECT = (50.0, 10.0, 80.0, 35.0)
_BOXES = np.array([_RECT, (0.0, 0.0, _W, _H), (5.0, 30.0, 40.0, 58.0), (10.0, 5.0, 30.0, 25.0)])
_INDEX = np.array([0, 1, 1, 2, 3, 0])
_LEVELS = np.array([1, 3, 2, 1, 1, 1])


def _image() -> np.ndarray:
    pixels = np.zeros((_H, _W, 3), np.uint8)
    x0, y0, x1, y1 = (int(v) for v in _RECT)
    pixels[y0:y1, x0:x1] = 255
    return pixels


def _write(directory: str, with_priors: bool, count: int = 6) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, shards.shard_name("train", 0, 1))
    priors = dict(region_boxes=_BOXES, region_box_index=_INDEX, region_levels=_LEVELS)
    with fh_records.atomic_shard(path) as writer:
        for i in range(count):
            example = schema.build_example(
                jpeg=image_codec.encode_jpeg(_image()),
                height=_H,
                width=_W,
                segmentations=np.zeros((1, _H, _W), np.int64),
                filename=f"{i}.jpg",
                label=i % 3 + 1,
                **(priors if with_priors else {}),
            )
            writer.write(example.SerializeToString())
    return directory


def _batches(directory: str, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    iterator = pipeline.pretrain_batches(
        directory,
        image_size=_S,
        local_devices=2,
        per_device_batch=3,
        deterministic=True,
        shuffle_buffer=4,
        with_masks=False,
        num_regions=_K,
        seed=seed,
    )
    return [next(iterator) for _ in range(count)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return _write(str(tmp_path_factory.mktemp("detreg")), with_priors=True)


def test_region_priors_round_trip_through_the_schema():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    serialized = fh_records.encode_record(
        image_codec.encode_jpeg(pixels),
        filename="x.jpg",
        label=1,
        synset="",
        text=None,
        scales=(100.0,),
        min_sizes=(10,),
        with_region_priors=True,
    )
    assert schema.has_region_priors(serialized)
    parsed = schema.parse_record(tf.constant(serialized), with_regions=True)
    decoded = image_codec.decode_rgb(parsed["encoded"]).numpy()
    expected = rp.selective_search(decoded)  # computed on the pixels training decodes
    np.testing.assert_array_equal(parsed["region_boxes"].numpy(), expected.boxes)
    np.testing.assert_array_equal(parsed["region_box_index"].numpy(), expected.box_index)
    np.testing.assert_array_equal(parsed["region_levels"].numpy(), expected.levels)
    plain = schema.parse_record(tf.constant(serialized))
    assert "region_boxes" not in plain  # other readers are unchanged


def test_schema_rejects_priors_that_do_not_fit_together():
    with pytest.raises(ValueError, match="box_index"):
        _write_bad = schema.build_example(
            jpeg=b"",
            height=1,
            width=1,
            segmentations=np.zeros((1, 1, 1), np.int64),
            filename="bad.jpg",
            region_boxes=_BOXES,
            region_box_index=np.array([0, 9]),
            region_levels=np.array([1, 1]),
        )
        del _write_bad


def test_tf_rank_draw_matches_the_numpy_reference_and_repeats_per_seed():
    priors = rp.RegionPriors(_BOXES.astype(np.float32), _INDEX, _LEVELS)
    for seed in ([3, 7], [4, 7]):
        seed = tf.constant(seed, tf.int64)
        boxes, valid = detreg_views.top_regions(
            tf.constant(priors.boxes), tf.constant(_INDEX), tf.constant(_LEVELS), 3, seed
        )
        uniforms = tf.random.stateless_uniform([len(_LEVELS)], seed, dtype=tf.float64).numpy()
        order = np.argsort(rp.box_ranks(priors, uniforms), kind="stable")[:3]
        np.testing.assert_array_equal(boxes.numpy(), priors.boxes[order])
        assert valid.numpy().all()
    # More slots than boxes: the rest are padding.
    boxes, valid = detreg_views.top_regions(
        tf.constant(priors.boxes), tf.constant(_INDEX), tf.constant(_LEVELS), 6, seed
    )
    assert valid.numpy().tolist() == [True] * 4 + [False] * 2
    np.testing.assert_array_equal(boxes.numpy()[4:], 0.0)


def test_scaled_sizes_follow_the_canvas_rule():
    assert detreg_views.scaled_sizes(600) == detreg_views.ScaledSizes(
        detreg_views.SCALES, detreg_views.CROP_RESIZES, 384, 600, 600
    )
    small = detreg_views.scaled_sizes(64)
    assert small.scales[0] == round(320 * 64 / 600) and small.crop_resizes == (43, 53, 64)
    assert small.crop_min == 41 and small.max_size == 64


def test_resized_shape_is_detr_get_size_with_aspect_ratio():
    def reference(h: int, w: int, size: int, max_size: int | None) -> tuple[int, int]:
        # facebookresearch/detr datasets/transforms.py, transcribed.
        if max_size is not None:
            lo, hi = float(min(w, h)), float(max(w, h))
            if hi / lo * size > max_size:
                size = int(round(max_size * lo / hi))
        if (w <= h and w == size) or (h <= w and h == size):
            return h, w
        if w < h:
            return int(size * h / w), size
        return size, int(size * w / h)

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(20, 900, 2))
        size = int(rng.integers(30, 500))
        max_size = None if rng.random() < 0.3 else int(rng.integers(size, 1000))
        got = detreg_views.resized_shape(h, w, size, max_size).numpy().tolist()
        want = list(reference(h, w, size, max_size))
        if max_size is not None:
            want = [min(v, max_size) for v in want]
        assert got == want, (h, w, size, max_size)


def test_batches_have_the_detreg_contract(dataset):
    (batch,) = _batches(dataset, 1)
    assert set(batch) == {"view1", "pad_mask", "region_boxes", "region_valid", "label"}
    assert batch["view1"].shape == (2, 3, _S, _S, 3) and batch["view1"].dtype == np.float32
    assert 0.0 <= batch["view1"].min() and batch["view1"].max() <= 1.0
    assert batch["pad_mask"].shape == (2, 3, _S, _S) and batch["pad_mask"].dtype == bool
    assert batch["region_boxes"].shape == (2, 3, _K, 4)
    assert batch["region_boxes"].dtype == np.float32
    assert batch["region_valid"].shape == (2, 3, _K) and batch["region_valid"].dtype == bool
    assert batch["label"].dtype == np.int32 and set(batch["label"].ravel()) <= {0, 1, 2}
    # Zeros off the image; the image is a top-left rectangle; 2..4 boxes, valid ones first.
    assert (batch["view1"][~batch["pad_mask"]] == 0).all()
    for mask in batch["pad_mask"].reshape(-1, _S, _S):
        h, w = mask[:, 0].sum(), mask[0].sum()
        assert mask[:h, :w].all() and mask.sum() == h * w and max(h, w) <= _S
    valid = batch["region_valid"].reshape(-1, _K)
    assert (valid.sum(1) >= 2).all() and (valid.sum(1) <= 4).all()
    assert all((np.diff(v.astype(int)) <= 0).all() for v in valid)
    boxes = batch["region_boxes"].reshape(-1, _K, 4)
    assert (boxes[valid] > 0).all() and (boxes[valid] <= 1).all()
    assert (boxes[~valid] == 0).all()


def test_batches_repeat_per_seed_and_differ_between_seeds(dataset):
    first, again, other = _batches(dataset, 2), _batches(dataset, 2), _batches(dataset, 2, 1)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(first[0]["region_boxes"], other[0]["region_boxes"])


def test_a_box_stays_on_its_pixels_through_flip_resize_and_crop():
    view = tf.function(
        lambda seed: detreg_views.detreg_view(
            tf.constant(_image()),
            tf.constant(_BOXES[:2], tf.float32),  # the rectangle and the whole image
            tf.constant([0, 1]),
            tf.constant([1, 1]),
            3,
            _S,
            seed,
        )
    )
    flips, crops = 0, 0
    for i in range(40):
        sample = view(tf.constant([i, 11], tf.int64))
        mask = sample["pad_mask"].numpy()
        h, w = int(mask[:, 0].sum()), int(mask[0].sum())
        valid = sample["region_valid"].numpy()
        assert valid.tolist() == [True, True, False]  # the redraw keeps both boxes
        cx, cy, bw, bh = sample["region_boxes"].numpy()[valid].T * np.array([[w], [h], [w], [h]])
        whole = np.isclose(bw, w) & np.isclose(bh, h)
        assert whole.sum() == 1  # the whole image stays the whole image
        (rect,) = np.flatnonzero(~whole)
        x0, x1 = cx[rect] - bw[rect] / 2, cx[rect] + bw[rect] / 2
        y0, y1 = cy[rect] - bh[rect] / 2, cy[rect] + bh[rect] / 2
        white = sample["view1"].numpy()[:h, :w].min(-1) > 0.5
        rows, cols = np.nonzero(white)
        # The white pixels fill the box, up to a pixel of resampling blur at each edge.
        assert abs(cols.min() - x0) <= 1 and abs(cols.max() + 1 - x1) <= 1
        assert abs(rows.min() - y0) <= 1 and abs(rows.max() + 1 - y1) <= 1
        flips += x0 < (w - x1)  # the rectangle sits on the right of the unflipped image
        crops += not np.isclose(w / h, _W / _H, atol=0.05)
    assert 0 < flips < 40 and crops > 0  # both flips and real crops were exercised


def test_records_without_priors_are_a_clear_error(tmp_path):
    directory = _write(str(tmp_path / "plain"), with_priors=False)
    with pytest.raises(errors.DatasetMismatchError, match="--region_priors") as error:
        _batches(directory, 1)
    assert "generate_fh_masks.py" in str(error.value) and "\n" not in str(error.value)


def test_the_training_loop_asks_for_the_methods_regions(dataset, monkeypatch):
    from detcon import methods
    from detcon.methods import base
    from detcon.train import loop

    from conftest import tiny_config

    config = tiny_config(image_size=_S)
    method = methods.get(config.method)
    monkeypatch.setattr(
        method, "data_needs", classmethod(lambda cls, c: base.DataNeeds(False, num_regions=_K))
    )
    batch = next(loop.real_batches(config, dataset, 0, 2, 3))
    assert batch["region_boxes"].shape == (2, 3, _K, 4) and batch["pad_mask"].shape == (
        2,
        3,
        _S,
        _S,
    )
    np.testing.assert_array_equal(batch["index"], np.arange(6).reshape(2, 3))
