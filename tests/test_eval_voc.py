"""PASCAL VOC layout reader: palette and index PNGs, resize and pad with 255, clear errors."""

import os

import numpy as np
import pytest
from PIL import Image

from detcon.evaluation import voc

from eval_fixtures import palette_png, write_voc


def test_palette_png_reads_class_indices(tmp_path):
    labels = np.array([[0, 1, 2], [3, 4, 255]], np.uint8)
    path = str(tmp_path / "l.png")
    palette_png(labels, path)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(voc.read_label(path), labels)


def test_index_png_reads_class_indices(tmp_path):
    labels = np.array([[0, 7], [255, 20]], np.uint8)
    path = str(tmp_path / "l.png")
    Image.fromarray(labels, mode="L").save(path)
    np.testing.assert_array_equal(voc.read_label(path), labels)


def test_rgb_label_png_is_refused(tmp_path):
    path = str(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match="rgb.png.*palette"):
        voc.read_label(path)


def test_resize_and_pad_marks_padding_ignored():
    image = np.full((20, 40, 3), 9, np.uint8)
    label = np.ones((20, 40), np.uint8)
    out_image, out_label = voc.resize_and_pad(image, label, 64)
    assert out_image.shape == (64, 64, 3) and out_label.shape == (64, 64)
    assert (out_label[:32] == 1).all() and (out_label[32:] == 255).all()
    assert (out_image[:32] == 9).all() and (out_image[32:] == 0).all()


def test_load_split_reads_fixture(tmp_path):
    root = str(tmp_path / "VOC")
    write_voc(root, num_train=3, num_val=2, height=48, width=64)
    images, labels = voc.load_split(root, "train", 64)
    assert images.shape == (3, 64, 64, 3) and labels.shape == (3, 64, 64)
    # 48 x 64 -> 48 x 64 at longer side 64: rows 48.. are padding.
    assert (labels[:, 48:] == 255).all()
    original = voc.read_label(os.path.join(root, "SegmentationClass", "train_000.png"))
    np.testing.assert_array_equal(labels[0, :48], original)
    assert set(np.unique(labels)) == {0, 1, 2, 255}
    assert voc.num_classes(labels) == 3
    # Foreground pixels of class 1 are the bright square of the image.
    assert images[0][labels[0] == 1].mean() > 150


def test_labels_scored_at_the_original_side_are_the_original_labels(tmp_path):
    root = str(tmp_path / "VOC")
    write_voc(root, num_train=2, num_val=1, height=32, width=32)
    _, labels = voc.load_split(root, "train", 128)  # enlarged 4x for the stride-32 torso
    native = voc.subsample_labels(labels, 32)
    assert native.shape == (2, 32, 32)
    for i in range(2):
        original = voc.read_label(os.path.join(root, "SegmentationClass", f"train_{i:03d}.png"))
        np.testing.assert_array_equal(native[i], original)
    with pytest.raises(ValueError, match="--seg_label_size=48 must divide --seg_image_size=128"):
        voc.subsample_labels(labels, 48)


def test_missing_layout_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="VOC-style root"):
        voc.split_ids(str(tmp_path), "train")


def test_size_not_multiple_of_32_is_refused(tmp_path):
    write_voc(str(tmp_path), 1, 1)
    with pytest.raises(ValueError, match="multiple of 32"):
        voc.load_split(str(tmp_path), "train", 50)
