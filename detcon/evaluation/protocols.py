"""The three probes end to end: data -> frozen features -> probe -> metrics and settings.

Evaluation is single-process: one host reads whole splits and maps the forward over its devices.
"""
import dataclasses
import math
from typing import Any

import jax
import numpy as np

from detcon.evaluation import datasets
from detcon.evaluation import features as features_lib
from detcon.evaluation import knn as knn_lib
from detcon.evaluation import linear as linear_lib
from detcon.evaluation import linear_augmented
from detcon.evaluation import segmentation as segmentation_lib
from detcon.evaluation import voc

PROTOCOLS = ("knn", "linear", "segmentation")
LINEAR_MODES = ("features", "augmented")


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a probe run needs besides the torso (mirrors the command-line flags)."""
    source: datasets.Source = datasets.Source()
    segmentation_directory: str = ""
    image_size: int = 224
    batch_size: int = 256
    knn_k: int = knn_lib.DEFAULT_K
    knn_temperature: float = knn_lib.DEFAULT_TEMPERATURE
    linear_mode: str = "features"
    linear_epochs: int = linear_augmented.DEFAULT_EPOCHS
    seg_image_size: int = 512
    seg_label_size: int = 0  # side the labels are scored at (0: seg_image_size); divides it
    seg_epochs: int = 30
    seg_batch_size: int = 16
    seg_learning_rate: float = 1e-3
    seg_num_classes: int = 0  # 0: 1 + the largest class index in the labels
    seed: int = 0


def per_device_batch(batch_size: int) -> int:
    """Per-device share of a global batch, rounded up so every device gets the same."""
    return max(1, math.ceil(batch_size / jax.local_device_count()))


def labelled_features(extractor: features_lib.Extractor, options: Options, train: bool
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Pooled centre-crop features [N, C] and labels [N] of the train or evaluation split."""
    split = datasets.split_name(options.source, train)
    batches, count = datasets.eval_batches(
        options.source, split, options.image_size, extractor.num_devices,
        per_device_batch(options.batch_size))
    feats, labels = features_lib.extract(extractor, batches, count, description=f"{split} features")
    if len(labels) == 0:
        raise ValueError(f"{options.source.describe()}: the {split!r} split has no labelled "
                         "examples (labels 1..N in our TFRecords); kNN and linear probes need "
                         "them.")
    return feats, labels


def _num_classes(*label_sets: np.ndarray) -> int:
    return int(max(int(labels.max()) for labels in label_sets)) + 1


def run_knn(extractor: features_lib.Extractor, options: Options) -> dict[str, Any]:
    """Weighted kNN top-1 (and top-5 with >= 5 classes) of the evaluation split."""
    train_x, train_y = labelled_features(extractor, options, train=True)
    eval_x, eval_y = labelled_features(extractor, options, train=False)
    classes = _num_classes(train_y, eval_y)
    scores = knn_lib.knn_scores(train_x, train_y, eval_x, classes, options.knn_k,
                                options.knn_temperature)
    result = {"top1": knn_lib.top_k_accuracy(scores, eval_y, 1)}
    if classes >= 5:
        result["top5"] = knn_lib.top_k_accuracy(scores, eval_y, 5)
    result.update(k=options.knn_k, temperature=options.knn_temperature,
                  image_size=options.image_size, num_train=len(train_y), num_eval=len(eval_y),
                  num_classes=classes, features="l2_normalised_global_pool_centre_crop")
    return result


def run_linear(extractor: features_lib.Extractor, torso: features_lib.FrozenTorso,
               options: Options) -> dict[str, Any]:
    """Linear probe top-1/top-5 on the evaluation split, in the chosen mode."""
    if options.linear_mode == "features":
        train_x, train_y = labelled_features(extractor, options, train=True)
        eval_x, eval_y = labelled_features(extractor, options, train=False)
        classes = _num_classes(train_y, eval_y)
        result = linear_lib.linear_probe(train_x, train_y, eval_x, eval_y, classes,
                                         seed=options.seed)
        result.update(mode="features", solver="lbfgs_logistic_regression",
                      held_out_fraction=linear_lib.HELD_OUT_FRACTION)
    else:
        eval_x, eval_y = labelled_features(extractor, options, train=False)
        split = datasets.split_name(options.source, train=True)
        num_train = datasets.num_examples(options.source, split)
        per_device = per_device_batch(options.batch_size)
        global_batch = per_device * jax.local_device_count()
        steps = max(1, options.linear_epochs * num_train // global_batch)
        batches = datasets.augmented_train_batches(
            options.source, options.image_size, extractor.num_devices, per_device, options.seed)
        classes = max(_num_classes(eval_y), datasets.num_classes(options.source))
        head, loss = linear_augmented.train(torso, batches, classes, eval_x.shape[1],
                                            global_batch, steps)
        scores = linear_augmented.scores(head, eval_x)
        result = {"top1": knn_lib.top_k_accuracy(scores, eval_y, 1), "final_train_loss": loss}
        if classes >= 5:
            result["top5"] = knn_lib.top_k_accuracy(scores, eval_y, 5)
        result.update(linear_augmented.settings(options.linear_epochs, global_batch, steps))
    result.update(image_size=options.image_size, num_eval=len(eval_y), num_classes=classes)
    return result


def run_segmentation(torso: features_lib.FrozenTorso, options: Options) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of a linear head on the frozen stride-32 map."""
    root = options.segmentation_directory or options.source.directory
    if not root:
        raise ValueError("--protocol=segmentation needs --dataset_directory (a VOC-layout root).")
    train_images, train_labels = voc.load_split(root, "train", options.seg_image_size)
    val_images, val_labels = voc.load_split(root, "val", options.seg_image_size)
    if options.seg_label_size:
        train_labels, val_labels = (voc.subsample_labels(x, options.seg_label_size)
                                    for x in (train_labels, val_labels))
    classes = options.seg_num_classes or voc.num_classes(train_labels, val_labels)
    extractor = features_lib.Extractor(torso, reduce=None)
    per_device = per_device_batch(options.seg_batch_size)

    def maps(images: np.ndarray, split: str) -> np.ndarray:
        batches = features_lib.device_batches(images, np.arange(len(images)), extractor.num_devices,
                                              per_device)
        total = math.ceil(len(images) / (extractor.num_devices * per_device))
        fmaps, order = features_lib.extract(extractor, batches, total, f"{split} feature maps")
        return fmaps[np.argsort(order)]

    head, shift, scale = segmentation_lib.train_head(
        maps(train_images, "train"), train_labels, classes, epochs=options.seg_epochs,
        batch_size=options.seg_batch_size, learning_rate=options.seg_learning_rate,
        seed=options.seed)
    result = segmentation_lib.evaluate_head(head, shift, scale, maps(val_images, "val"),
                                            val_labels, classes, options.seg_batch_size)
    result.update(num_classes=classes, image_size=options.seg_image_size,
                  label_size=int(val_labels.shape[-1]),
                  epochs=options.seg_epochs, batch_size=options.seg_batch_size,
                  learning_rate=options.seg_learning_rate, optimizer="adamw_cosine",
                  head="1x1_linear_on_standardised_stride32_map_bilinear_upsampled_logits",
                  ignore_label=segmentation_lib.IGNORE_LABEL, num_train=len(train_labels),
                  num_eval=len(val_labels))
    return result
