"""kNN monitoring during pretraining: the monitor function and its hook in the training loop."""

import json
import os

import numpy as np
import pytest

from detcon.data import labelled
from detcon.evaluation import features, monitor, protocols
from detcon.train import loop as train_loop

from conftest import tiny_config
from eval_fixtures import write_tfrecords


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("records"))
    write_tfrecords(directory, {"train": 6, "validation": 3}, num_classes=3, size=36)
    return directory


def _config(records: str, every: int):
    config = tiny_config(batch_size=8, image_size=32)
    config.evaluation.every_steps = every
    config.evaluation.dataset_directory = records
    config.evaluation.batch_size = 16
    return config


def test_off_by_default_in_the_imagenet_recipe():
    from conftest import load_config

    assert load_config("detcon_b").evaluation.every_steps == 0
    assert monitor.make_knn_monitor(tiny_config(), None) is None


def test_monitor_equals_offline_knn_of_the_online_torso(records):
    config = _config(records, every=1)
    torso = features.random_init(10, 1, seed=3)
    # A whole online network: the torso plus head modules the monitor must leave out.
    params = {**torso.params, "projector/~/linear": {"w": np.ones((512, 64), np.float32)}}
    got = monitor.make_knn_monitor(config, None)(params, torso.state)
    want = protocols.run_knn(
        features.Extractor(torso),
        protocols.Options(source=labelled.Source(directory=records), image_size=32, batch_size=16),
    )
    assert got == {"knn_top1": want["top1"]}


def test_missing_evaluation_data_fails_before_training():
    config = tiny_config()
    config.evaluation.every_steps = 5
    with pytest.raises(ValueError, match="evaluation.dataset_directory"):
        monitor.make_knn_monitor(config, None)
    config.evaluation.dataset_directory = "/nonexistent/eval"
    with pytest.raises(FileNotFoundError, match="/nonexistent/eval"):
        monitor.make_knn_monitor(config, None)


@pytest.mark.slow  # compiles the DetCon-B step on 8 devices
def test_training_logs_knn_top1(records, tmp_path):
    config = _config(records, every=2)
    config.training.max_steps = 4
    train_loop.run(config, str(tmp_path))
    lines = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    knn_steps = [line["step"] for line in lines if "knn_top1" in line]
    assert knn_steps == [2, 4]
    assert all(0.0 <= line["knn_top1"] <= 1.0 for line in lines if "knn_top1" in line)
    assert os.listdir(os.path.join(tmp_path, "tensorboard"))
