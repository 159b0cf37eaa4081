"""Record schema: round trips, official-only records, and segment ids above 255."""

import numpy as np
import pytest
import tensorflow as tf

from detcon.data import image_codec, pipeline, schema


def _image_and_mask(
    height: int = 12, width: int = 20, num_ids: int = 7
) -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    ids = rng.integers(0, num_ids, (2, height, width))
    return image_codec.encode_jpeg(pixels), ids


def _official_reader_ids(serialized: bytes, num_scales: int, height: int, width: int) -> np.ndarray:
    """The official imagenet_with_fh reader's view of the ids: uint8 bytes reshaped to [K, H, W]."""
    spec = {schema.FH_SEGMENTATIONS: tf.io.VarLenFeature(tf.string)}
    parsed = tf.io.parse_single_example(serialized, spec)[schema.FH_SEGMENTATIONS]
    raw = tf.io.decode_raw(tf.sparse.to_dense(parsed, default_value=""), tf.uint8)
    return tf.reshape(raw, [num_scales, height, width]).numpy()


def test_round_trip_keeps_image_label_and_masks():
    jpeg, ids = _image_and_mask()
    example = schema.build_example(
        jpeg=jpeg,
        height=12,
        width=20,
        segmentations=ids,
        filename="a.jpg",
        label=3,
        synset="n0001",
        text="thing",
        fh_scales=(10.0, 20.0),
        fh_min_sizes=(5, 6),
    )
    decoded = pipeline.decode_example(example.SerializeToString())
    np.testing.assert_array_equal(decoded["fh"].numpy(), ids)
    np.testing.assert_array_equal(
        decoded["image"].numpy(), tf.io.decode_jpeg(jpeg, channels=3).numpy()
    )
    assert decoded["label"].numpy() == 2  # stored labels count from 1, training classes from 0
    features = example.features.feature
    assert features[schema.TEXT].bytes_list.value == [b"thing"]
    assert features[schema.FORMAT].bytes_list.value == [b"JPEG"]
    assert list(features[schema.FH_MIN_SIZES].int64_list.value) == [5, 6]
    assert schema.FH_SEGMENTATIONS_UINT16 not in features  # small ids: official key only


def test_record_with_only_official_keys_parses():
    jpeg, ids = _image_and_mask()
    ids = ids[:1]
    feature = {
        schema.ENCODED: tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg])),
        schema.LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[7])),
        schema.FH_SEGMENTATIONS: tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[ids.astype(np.uint8).tobytes()])
        ),
        schema.HEIGHT: tf.train.Feature(int64_list=tf.train.Int64List(value=[12])),
        schema.WIDTH: tf.train.Feature(int64_list=tf.train.Int64List(value=[20])),
        schema.SYNSET: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"n0007"])),
    }
    serialized = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
    decoded = pipeline.decode_example(serialized)
    np.testing.assert_array_equal(decoded["fh"].numpy(), ids)
    assert decoded["label"].numpy() == 6


def test_missing_label_reads_as_minus_one():
    jpeg, ids = _image_and_mask()
    example = schema.build_example(jpeg=jpeg, height=12, width=20, segmentations=ids, filename="x")
    assert pipeline.decode_example(example.SerializeToString())["label"].numpy() == -1


def test_ids_above_255_survive_and_official_key_wraps_like_official_tool():
    jpeg, _ = _image_and_mask()
    ids = np.arange(2 * 12 * 20).reshape(2, 12, 20) * 100  # up to 47_900
    serialized = schema.build_example(
        jpeg=jpeg, height=12, width=20, segmentations=ids, filename="many.jpg"
    ).SerializeToString()
    np.testing.assert_array_equal(pipeline.decode_example(serialized)["fh"].numpy(), ids)
    np.testing.assert_array_equal(_official_reader_ids(serialized, 2, 12, 20), ids % 256)


def test_our_small_id_records_load_in_official_reader():
    jpeg, ids = _image_and_mask()
    serialized = schema.build_example(
        jpeg=jpeg, height=12, width=20, segmentations=ids, filename="a.jpg"
    ).SerializeToString()
    np.testing.assert_array_equal(_official_reader_ids(serialized, 2, 12, 20), ids)


def test_ids_beyond_uint16_and_shape_mismatch_are_rejected():
    jpeg, ids = _image_and_mask()
    with pytest.raises(ValueError, match="fh_min_sizes"):
        schema.build_example(
            jpeg=jpeg, height=12, width=20, segmentations=ids + 70_000, filename="big.jpg"
        )
    with pytest.raises(ValueError, match="bad.jpg.*num_scales, 12, 21"):
        schema.build_example(jpeg=jpeg, height=12, width=21, segmentations=ids, filename="bad.jpg")


def test_segmentation_bytes_that_do_not_fit_the_image_fail_clearly():
    jpeg, ids = _image_and_mask()
    example = schema.build_example(jpeg=jpeg, height=12, width=20, segmentations=ids, filename="a")
    truncated = ids.astype(np.uint8).tobytes()[:-5]
    example.features.feature[schema.FH_SEGMENTATIONS].bytes_list.value[:] = [truncated]
    with pytest.raises(tf.errors.InvalidArgumentError, match="generate_fh_masks"):
        pipeline.decode_example(example.SerializeToString())
