"""BatchNorm statistics recomputed on the probe's images: equal to the batch statistics of a
training-mode forward, averaged over chunks, and reachable from every probe by one option."""

import haiku as hk
import numpy as np
import pytest

from detcon.data import labelled
from detcon.evaluation import features, protocols
from detcon.models import networks
from detcon.ops import augment

from eval_fixtures import write_tfrecords, write_voc


def _images(count: int, side: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(count, side, side, 3)).astype(np.float32)


def _trained_like(seed: int = 0):
    """A random torso whose moving statistics are far from the identity (as after training)."""
    torso = features.random_init(10, 1, seed=seed, image_size=32)
    rng = np.random.default_rng(seed)
    state = {
        module: {
            name: (
                rng.uniform(0.5, 2.0, value.shape).astype(np.float32)
                if name == "average"
                else value
            )
            for name, value in leaves.items()
        }
        for module, leaves in torso.state.items()
    }
    return torso._replace(state=state)


def test_one_chunk_equals_the_training_mode_forward():
    """Inference with recomputed statistics on X = the training-mode (batch statistics) forward
    on X, through every BatchNorm of the torso."""
    torso = _trained_like()
    images = _images(12)
    recomputed = features.recompute_batch_norm(torso, images, batch_size=16)
    transformed = networks.torso_fn(10, 1)
    x = augment.normalize(images)
    want, _ = transformed.apply(torso.params, torso.state, None, x, is_training=True)
    got, _ = transformed.apply(recomputed.params, recomputed.state, None, x, is_training=False)
    before, _ = transformed.apply(torso.params, torso.state, None, x, is_training=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(before) - np.asarray(want)).max() > 0.1  # the change is real


def test_chunks_are_averaged_by_size():
    """The first BatchNorm sees the stem convolution, linear in the images: its mean over chunks of
    8 + 8 + 4 weighted by size is the mean over all 20 images."""
    torso = _trained_like(1)
    images = _images(20, seed=1)
    whole = features.recompute_batch_norm(torso, images, batch_size=32)
    chunked = features.recompute_batch_norm(torso, images, batch_size=8)
    module = next(m for m in whole.state if m.endswith("initial_batchnorm/~/mean_ema"))
    np.testing.assert_allclose(
        chunked.state[module]["average"], whole.state[module]["average"], rtol=1e-5, atol=1e-6
    )
    # Parameters are untouched, and only the averages change.
    assert hk.data_structures.to_haiku_dict(chunked.params) is not None
    for module, leaves in torso.state.items():
        np.testing.assert_array_equal(chunked.state[module]["counter"], leaves["counter"])


def test_max_images_caps_the_set():
    torso = _trained_like(2)
    images = _images(16, seed=2)
    capped = features.recompute_batch_norm(torso, images, max_images=4)
    first = features.recompute_batch_norm(torso, images[:4])
    for module in capped.state:
        np.testing.assert_array_equal(
            capped.state[module]["average"], first.state[module]["average"]
        )
    with pytest.raises(ValueError, match="at least one image"):
        features.recompute_batch_norm(torso, images[:0])


def test_knn_and_segmentation_use_the_option(tmp_path):
    """bn_statistics=probe measures the statistics on the bank (kNN) and on the training images
    (segmentation): results differ from the moving rule on a torso with skewed statistics."""
    records, voc_root = str(tmp_path / "records"), str(tmp_path / "voc")
    write_tfrecords(records, {"train": 8, "validation": 4}, num_classes=3)
    write_voc(voc_root, num_train=4, num_val=3)
    torso = _trained_like(3)
    results = {}
    for rule in ("moving", "probe"):
        options = protocols.Options(
            source=labelled.Source(directory=records),
            segmentation_directory=voc_root,
            image_size=32,
            batch_size=16,
            seg_image_size=64,
            seg_epochs=1,
            seg_batch_size=4,
            bn_statistics=rule,
        )
        extractor = features.Extractor(torso)
        results[rule] = protocols.run_knn(extractor, options, torso)
        bank = protocols.bank_images(options)
        assert bank.shape == (24, 32, 32, 3)
        recomputed = features.recompute_batch_norm(torso, bank)
        want = features.extract(
            features.Extractor(recomputed if rule == "probe" else torso),
            features.device_batches(bank, np.zeros(len(bank), np.int32), extractor.num_devices, 3),
        )[0]
        got = features.extract(
            extractor,
            features.device_batches(bank, np.zeros(len(bank), np.int32), extractor.num_devices, 3),
        )[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        seg = protocols.run_segmentation(torso, options)
        assert seg["bn_statistics"] == rule and results[rule]["bn_statistics"] == rule
    with pytest.raises(ValueError, match="needs the torso"):
        protocols.run_knn(features.Extractor(torso), options)
