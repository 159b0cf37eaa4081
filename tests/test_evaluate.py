"""python -m detcon.evaluate in-process on ResNet-10: every protocol on a random-init torso, a real
checkpoint, TFDS mock data, and flag errors before any work."""

import json
import sys
from unittest import mock

import jax
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from detcon import evaluate
from detcon.data import labelled
from detcon.evaluation import features, protocols
from detcon.weights import torso as torso_lib

from conftest import REPO, tiny_config
from eval_fixtures import write_tfrecords, write_voc

FLAGS = flags.FLAGS
CONFIG = str(REPO / "configs" / "demo.py")
SMALL = ["--config.model.depth=10", "--image_size=32", "--batch_size=16"]


def _main(argv: list[str]) -> None:
    """Parses argv as the command line and runs evaluate.main, restoring the flags after."""
    # config_flags defines the --config.* overrides from sys.argv when --config is parsed.
    with flagsaver.flagsaver(), mock.patch.object(sys, "argv", ["evaluate"] + argv):
        FLAGS.unparse_flags()
        FLAGS(["evaluate"] + argv)
        evaluate.main(["evaluate"])


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("records"))
    write_tfrecords(directory, {"train": 8, "validation": 4}, num_classes=3)
    return directory


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("voc"))
    write_voc(root, num_train=4, num_val=3)
    return root


def test_random_init_runs_every_protocol(records, voc_root, tmp_path, capsys):
    output = str(tmp_path / "r.json")
    _main(
        [
            "--random_init",
            f"--config={CONFIG}",
            "--protocol=knn,linear,segmentation",
            f"--dataset_directory={records}",
            f"--segmentation_directory={voc_root}",
            "--seg_image_size=128",
            "--seg_label_size=64",
            "--seg_epochs=2",
            "--seg_batch_size=4",
            f"--output={output}",
        ]
        + SMALL
    )
    result = json.load(open(output))
    assert result["random_init"] and result["model"] == {"depth": 10, "width_multiplier": 1}
    for name in ("knn", "linear"):
        assert 0.0 <= result[name]["top1"] <= 1.0
        assert result[name]["num_eval"] == 12 and result[name]["num_classes"] == 3
    assert result["knn"]["k"] == 20 and result["knn"]["temperature"] == 0.07
    assert result["linear"]["mode"] == "features"
    seg = result["segmentation"]
    assert seg["num_classes"] == 3 and len(seg["per_class_iou"]) == 3
    assert seg["image_size"] == 128 and seg["label_size"] == 64
    assert 0.0 <= seg["miou"] <= 1.0 and 0.0 <= seg["pixel_accuracy"] <= 1.0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("knn top1 ") and "segmentation mIoU" in line and output in line


def test_colour_classes_are_found_by_knn_on_random_features(records):
    """Classes differ by dominant colour: even a random torso's features separate them."""
    torso = features.random_init(10, 1, seed=0)
    options = protocols.Options(
        source=labelled.Source(directory=records), image_size=32, batch_size=16
    )
    result = protocols.run_knn(features.Extractor(torso), options)
    assert result["top1"] >= 0.9 and result["num_train"] == 24


def test_augmented_linear_mode(records):
    torso = features.random_init(10, 1, seed=0)
    options = protocols.Options(
        source=labelled.Source(directory=records),
        image_size=32,
        batch_size=16,
        linear_mode="augmented",
        linear_epochs=2,
    )
    result = protocols.run_linear(features.Extractor(torso), torso, options)
    assert result["mode"] == "augmented" and result["steps"] == 2 * 24 // 16
    assert result["batch_size"] == 16 and result["learning_rate"] == pytest.approx(0.2 * 16 / 256)
    assert np.isfinite(result["final_train_loss"]) and 0.0 <= result["top1"] <= 1.0


def test_augmented_step_leaves_torso_frozen():
    """Only the head changes; gradients never reach the torso (inference mode, stop-gradient)."""
    torso = features.random_init(10, 1, seed=0)
    fmap = features.make_feature_map_fn(torso)
    images = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
    grads = jax.grad(lambda p: features.pooled(fmap(p, torso.state, images)).sum())(torso.params)
    assert all(float(abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.slow  # trains one DetCon-B step on 8 devices first
def test_checkpoint_torso_matches_training_network(tmp_path, records):
    """The evaluated torso of a trained checkpoint gives the training network's pooled features."""
    from detcon.models import heads as model_lib
    from detcon.ops import augment
    from detcon.train import experiment as experiment_lib
    from detcon.train import loop as train_loop
    from detcon.workdir import checkpoint as checkpoint_lib

    config = tiny_config(batch_size=8, image_size=32)
    config.training.max_steps = 1
    train_loop.run(config, str(tmp_path))
    params, state, config_dict = checkpoint_lib.load_network(str(tmp_path), "online")
    torso = torso_lib.from_network(params, state, config_dict["model"])
    assert all(k.startswith("res_net10") for k in torso.params)
    images = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (8, 32, 32, 3)))
    got = features.Extractor(torso)(images.reshape(8, 1, 32, 32, 3))
    network = experiment_lib.build(config, 1, axis_name=None).network
    view = model_lib.MaskedView(
        augment.normalize(images), np.ones((8, 1, 1), np.float32), np.zeros((8, 1), np.int32)
    )
    outputs, _ = network.apply(params, state, None, view, is_training=False)
    want = np.asarray(outputs.features)
    # The two programs fuse the same fp32 sums differently, so a small feature can differ by
    # rounding at the scale of the largest ones: the absolute tolerance follows that scale.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

    output = str(tmp_path / "ckpt.json")
    _main(
        [
            f"--checkpoint={tmp_path}",
            "--network=target",
            "--protocol=knn",
            f"--dataset_directory={records}",
            f"--output={output}",
            "--image_size=32",
        ]
    )
    result = json.load(open(output))
    assert result["network"] == "target" and result["method"] == "detcon_b"
    assert 0.0 <= result["knn"]["top1"] <= 1.0


def test_tfds_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    output = str(tmp_path / "tfds.json")
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        source = labelled.Source(tfds_name="cifar10", tfds_data_dir=str(tmp_path / "none"))
        assert labelled.split_name(source, train=False) == "test"
        assert labelled.num_classes(source) == 10
        batches, count = labelled.eval_batches(source, "test", 32, local_devices=8, per_device=2)
        batches = list(batches)
        assert count == len(batches) == 2 and batches[0]["image"].shape == (8, 2, 32, 32, 3)
        assert (np.concatenate([b["label"].ravel() for b in batches]) >= 0).sum() == 20
        _main(
            [
                "--random_init",
                f"--config={CONFIG}",
                "--protocol=knn,linear",
                "--tfds_name=cifar10",
                f"--tfds_data_dir={tmp_path / 'none'}",
                f"--output={output}",
            ]
            + SMALL
        )
    result = json.load(open(output))
    assert result["knn"]["num_train"] == 20 and result["knn"]["num_eval"] == 20
    assert "top5" in result["knn"] and "top5" in result["linear"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--protocol=knn", "--output=x.json", "--dataset_directory=d"], "exactly one of"),
        (
            ["--random_init", "--protocol=knn", "--output=x.json", "--dataset_directory=d"],
            "needs --config",
        ),
        (
            [
                "--random_init",
                f"--config={CONFIG}",
                "--protocol=knn,depth",
                "--output=x.json",
                "--dataset_directory=d",
            ],
            "choose from",
        ),
        (
            ["--random_init", f"--config={CONFIG}", "--protocol=knn", "--output=x.json"],
            "--dataset_directory",
        ),
        (
            [
                "--random_init",
                f"--config={CONFIG}",
                "--protocol=segmentation",
                "--output=x.json",
                "--dataset_directory=d",
                "--seg_image_size=100",
            ],
            "multiple of 32",
        ),
        (
            [
                "--random_init",
                f"--config={CONFIG}",
                "--protocol=segmentation",
                "--output=x.json",
                "--dataset_directory=d",
                "--seg_image_size=128",
                "--seg_label_size=48",
            ],
            "must divide",
        ),
    ],
)
def test_bad_flags_fail_early(argv, message):
    from absl import app

    with pytest.raises(app.UsageError, match=message):
        _main(argv)


def _random_init(protocols_flag: str, records: str, voc_root: str, output: str) -> list[str]:
    return [
        "--random_init",
        f"--config={CONFIG}",
        f"--protocol={protocols_flag}",
        f"--dataset_directory={records}",
        f"--segmentation_directory={voc_root}",
        "--seg_epochs=3",
        "--seg_batch_size=4",
        f"--output={output}",
    ] + SMALL


def test_progress_for_every_phase_and_a_segmentation_size_that_fits_the_data(
    records, voc_root, tmp_path, caplog
):
    import logging

    from detcon.evaluation import voc

    assert voc.fitting_image_size(voc_root) == 64  # 48 x 64 images
    output = str(tmp_path / "r.json")
    caplog.set_level(logging.INFO)
    _main(_random_init("segmentation", records, voc_root, output) + ["--verbosity=0"])
    result = json.load(open(output))["segmentation"]
    assert result["image_size"] == 64 and result["label_size"] == 64
    lines = [r.getMessage() for r in caplog.records]
    epochs = [line for line in lines if line.startswith("segmentation head: epoch")]
    assert [line.split(" loss ")[0] for line in epochs] == [
        f"segmentation head: epoch {e}/3" for e in (1, 2, 3)
    ]
    assert all(float(line.split(" loss ")[1]) > 0 for line in epochs)
    assert any(line.startswith("segmentation input size 64 px") for line in lines)
    assert any(line == f"segmentation finished -> {output}" for line in lines)


def test_sigterm_keeps_finished_protocols_and_exits_128_plus_signal(
    records, voc_root, tmp_path, monkeypatch, capsys
):
    import os
    import signal

    from detcon.evaluation import segmentation

    real_train_head = segmentation.train_head

    def terminated_during_the_head(*args, **kwargs):
        kwargs["on_epoch"] = lambda epoch, loss: os.kill(os.getpid(), signal.SIGTERM)
        return real_train_head(*args, **kwargs)

    monkeypatch.setattr(segmentation, "train_head", terminated_during_the_head)
    output = str(tmp_path / "r.json")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        _main(_random_init("knn,segmentation", records, voc_root, output))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    result = json.load(open(output))
    assert 0.0 <= result["knn"]["top1"] <= 1.0 and "segmentation" not in result
    assert result["unfinished"] == ["segmentation"]
    error = _error_lines(capsys.readouterr().err)
    assert len(error) == 1 and "stopped by SIGTERM; kept knn in " in error[0]
    assert error[0].endswith("run again with --protocol=segmentation to finish")


def _error_lines(stderr: str) -> list[str]:
    """stderr without the progress bars (carriage-return redraws): no traceback, only errors."""
    assert "Traceback" not in stderr, stderr
    lines = [line.split("\r")[-1].strip() for line in stderr.splitlines()]
    return [line for line in lines if line and "batch/s]" not in line and "batch]" not in line]


def test_user_mistakes_after_the_flags_are_one_line(tmp_path, capsys):
    unlabelled = str(tmp_path / "unlabelled")
    write_tfrecords(unlabelled, {"train": 2, "validation": 2}, num_classes=2, labelled=False)
    output = str(tmp_path / "r.json")
    argv = [
        "--random_init",
        f"--config={CONFIG}",
        "--protocol=knn",
        f"--dataset_directory={unlabelled}",
        f"--output={output}",
    ] + SMALL
    with pytest.raises(SystemExit) as stopped:
        _main(argv)
    assert stopped.value.code == 1
    error = _error_lines(capsys.readouterr().err)
    assert len(error) == 1 and "split has no labelled examples" in error[0], error
    empty = tmp_path / "run" / "checkpoints" / "3"
    (empty / "state").mkdir(parents=True)  # a step that died before writing anything
    with pytest.raises(SystemExit):
        _main(["--checkpoint=" + str(tmp_path / "run"), "--protocol=knn"] + argv[3:5])
    error = _error_lines(capsys.readouterr().err)
    assert len(error) == 1 and "No checkpoint under" in error[0], error
