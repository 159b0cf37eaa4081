"""Embedded demo dataset: built once, atomically, from bundled photos; readable by the pipeline."""

import os

import numpy as np
import tensorflow as tf

from detcon.data import pipeline, schema
from detcon.data.build import demo


def test_demo_dataset_is_built_once_and_trains(tmp_path):
    directory = demo.ensure_demo_dataset(str(tmp_path / "demo_fh"))
    assert directory == str(tmp_path / "demo_fh")
    assert pipeline.num_examples(directory, "train") == 30
    assert pipeline.num_examples(directory, "validation") == 6
    assert sorted(os.listdir(tmp_path)) == ["demo_fh"]  # no staging directory left behind
    stamps = {n: os.stat(os.path.join(directory, n)).st_mtime_ns for n in os.listdir(directory)}
    assert demo.ensure_demo_dataset(directory) == directory
    assert {
        n: os.stat(os.path.join(directory, n)).st_mtime_ns for n in os.listdir(directory)
    } == stamps

    labels, segment_counts = set(), []
    for path in pipeline.list_shards(directory, "train"):
        for record in tf.data.TFRecordDataset(path):
            example = pipeline.decode_example(record)
            labels.add(int(example["label"]))
            segment_counts.append(len(np.unique(example["fh"].numpy())))
            features = tf.train.Example.FromString(record.numpy()).features.feature
            assert (
                features[schema.TEXT].bytes_list.value[0].decode()
                == demo.PHOTOS[int(example["label"])]
            )
    assert labels == set(range(len(demo.PHOTOS)))
    assert min(segment_counts) >= 3  # enough regions for DetCon to contrast

    batch = next(
        pipeline.pretrain_batches(
            directory,
            image_size=32,
            local_devices=1,
            per_device_batch=4,
            deterministic=True,
            shuffle_buffer=30,
        )
    )
    assert batch["view1"].shape == (1, 4, 32, 32, 3)


def test_default_location_follows_detcon_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("DETCON_DATA_HOME", str(tmp_path))
    assert demo.data_home() == str(tmp_path)
    monkeypatch.delenv("DETCON_DATA_HOME")
    assert demo.data_home() == os.path.join(os.path.expanduser("~"), ".cache", "detcon")
