"""The probes by name, end to end: data -> frozen features -> probe -> metrics and settings.

Evaluation is single-process: one host reads whole splits and maps the forward over its devices.
"""

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging

from detcon.data import labelled
from detcon.data.build import region_priors
from detcon.evaluation import coco_scoring, detection, linear_augmented, spread, voc
from detcon.evaluation import features as features_lib
from detcon.evaluation import knn as knn_lib
from detcon.evaluation import linear as linear_lib
from detcon.evaluation import options as options_lib
from detcon.evaluation import segmentation as segmentation_lib
from detcon.weights import torso as torso_lib

Options = options_lib.Options


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A probe by name: what data it reads and how it runs on a `Subject`."""

    name: str
    run: Callable[["Subject", Options], dict[str, Any]]
    needs_labelled_images: bool  # True: a TFRecord/TFDS source; False: a VOC-layout root


PROTOCOLS: dict[str, Protocol] = {}


def register(name: str, *, needs_labelled_images: bool) -> Callable:
    """Decorator: makes `run(subject, options) -> metrics` the protocol `name`."""

    def decorate(run: Callable[["Subject", Options], dict[str, Any]]) -> Callable:
        PROTOCOLS[name] = Protocol(name, run, needs_labelled_images)
        return run

    return decorate


def get(name: str) -> Protocol:
    """The protocol registered as `name`; the error lists the registered names."""
    if name not in PROTOCOLS:
        raise ValueError(f"--protocol={name}: choose from {','.join(PROTOCOLS)}.")
    return PROTOCOLS[name]


class Subject:
    """The frozen torso under evaluation, the config of the run it came from ({} for a weights
    file) and its pooled-feature extractor, built once on use."""

    def __init__(self, torso: torso_lib.FrozenTorso, config: Optional[dict] = None):
        self.torso = torso
        self.config = config or {}
        self._extractor = None

    @property
    def extractor(self) -> features_lib.Extractor:
        if self._extractor is None:
            self._extractor = features_lib.Extractor(self.torso)
        return self._extractor


def per_device_batch(batch_size: int) -> int:
    """Per-device share of a global batch, rounded up so every device gets the same."""
    return max(1, math.ceil(batch_size / jax.local_device_count()))


def labelled_features(
    extractor: features_lib.Extractor, options: Options, train: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled centre-crop features [N, C] and labels [N] of the train or evaluation split."""
    split = labelled.split_name(options.source, train)
    batches, count = labelled.eval_batches(
        options.source,
        split,
        options.image_size,
        extractor.num_devices,
        per_device_batch(options.batch_size),
    )
    feats, labels = features_lib.extract(extractor, batches, count, description=f"{split} features")
    if len(labels) == 0:
        raise ValueError(
            f"{options.source.describe()}: the {split!r} split has no labelled "
            "examples (labels 1..N in our TFRecords); kNN and linear probes need "
            "them."
        )
    return feats, labels


def bank_images(options: Options, max_images: int = 512) -> np.ndarray:
    """The first `max_images` labelled centre crops [N, S, S, 3] of the training split."""
    split = labelled.split_name(options.source, train=True)
    per_device = per_device_batch(options.batch_size)
    batches, _ = labelled.eval_batches(
        options.source, split, options.image_size, jax.local_device_count(), per_device
    )
    kept, count = [], 0
    for batch in batches:
        images = np.asarray(batch["image"]).reshape((-1,) + batch["image"].shape[2:])
        images = images[np.asarray(batch["label"]).reshape(-1) >= 0]
        kept.append(images)
        count += len(images)
        if count >= max_images:
            break
    return np.concatenate(kept)[:max_images]


def with_probe_statistics(
    torso: torso_lib.FrozenTorso, options: Options, images: Callable[[], np.ndarray]
) -> torso_lib.FrozenTorso:
    """The torso as --bn_statistics asks: unchanged, or BatchNorm measured on `images()`."""
    if options.bn_statistics == "moving":
        return torso
    return features_lib.recompute_batch_norm(torso, images())


def _num_classes(*label_sets: np.ndarray) -> int:
    return int(max(int(labels.max()) for labels in label_sets)) + 1


def run_knn(
    extractor: features_lib.Extractor,
    options: Options,
    torso: torso_lib.FrozenTorso | None = None,
) -> dict[str, Any]:
    """Weighted kNN top-1 (and top-5 with >= 5 classes) of the evaluation split.

    With --bn_statistics=probe the extractor is loaded with `torso`'s weights and BatchNorm
    statistics of the bank's images.
    """
    if options.bn_statistics != "moving":
        if torso is None:
            raise ValueError("--bn_statistics=probe needs the torso to recompute statistics.")
        extractor.load(with_probe_statistics(torso, options, lambda: bank_images(options)))
    train_x, train_y = labelled_features(extractor, options, train=True)
    eval_x, eval_y = labelled_features(extractor, options, train=False)
    classes = _num_classes(train_y, eval_y)
    scores = knn_lib.knn_scores(
        train_x, train_y, eval_x, classes, options.knn_k, options.knn_temperature
    )
    result = {"top1": knn_lib.top_k_accuracy(scores, eval_y, 1)}
    if classes >= 5:
        result["top5"] = knn_lib.top_k_accuracy(scores, eval_y, 5)
    result.update(
        k=options.knn_k,
        temperature=options.knn_temperature,
        image_size=options.image_size,
        num_train=len(train_y),
        num_eval=len(eval_y),
        num_classes=classes,
        features="l2_normalised_global_pool_centre_crop",
        bn_statistics=options.bn_statistics,
        # Collapse check on the bank: a torso that maps every image to a few directions.
        bank_spread=spread.feature_spread(train_x),
    )
    return result


def run_linear(
    extractor: features_lib.Extractor, torso: torso_lib.FrozenTorso, options: Options
) -> dict[str, Any]:
    """Linear probe top-1/top-5 on the evaluation split, in the chosen mode."""
    if options.bn_statistics != "moving":
        torso = with_probe_statistics(torso, options, lambda: bank_images(options))
        extractor.load(torso)
    if options.linear_mode == "features":
        train_x, train_y = labelled_features(extractor, options, train=True)
        eval_x, eval_y = labelled_features(extractor, options, train=False)
        classes = _num_classes(train_y, eval_y)
        result = linear_lib.linear_probe(
            train_x, train_y, eval_x, eval_y, classes, seed=options.seed
        )
        result.update(
            mode="features",
            solver="lbfgs_logistic_regression",
            held_out_fraction=linear_lib.HELD_OUT_FRACTION,
        )
    else:
        eval_x, eval_y = labelled_features(extractor, options, train=False)
        split = labelled.split_name(options.source, train=True)
        num_train = labelled.num_examples(options.source, split)
        per_device = per_device_batch(options.batch_size)
        global_batch = per_device * jax.local_device_count()
        steps = max(1, options.linear_epochs * num_train // global_batch)
        batches = labelled.augmented_train_batches(
            options.source, options.image_size, extractor.num_devices, per_device, options.seed
        )
        classes = max(_num_classes(eval_y), labelled.num_classes(options.source))
        head, loss = linear_augmented.train(
            torso, batches, classes, eval_x.shape[1], global_batch, steps
        )
        scores = linear_augmented.scores(head, eval_x)
        result = {"top1": knn_lib.top_k_accuracy(scores, eval_y, 1), "final_train_loss": loss}
        if classes >= 5:
            result["top5"] = knn_lib.top_k_accuracy(scores, eval_y, 5)
        result.update(linear_augmented.settings(options.linear_epochs, global_batch, steps))
    result.update(
        image_size=options.image_size,
        num_eval=len(eval_y),
        num_classes=classes,
        bn_statistics=options.bn_statistics,
    )
    return result


def feature_maps(
    extractor: features_lib.Extractor, images: np.ndarray, per_device: int, split: str
) -> np.ndarray:
    """The frozen stride-32 maps [N, h, w, C] of images [N, S, S, 3] uint8, in order."""
    batches = features_lib.device_batches(
        images, np.arange(len(images)), extractor.num_devices, per_device
    )
    total = math.ceil(len(images) / (extractor.num_devices * per_device))
    fmaps, order = features_lib.extract(extractor, batches, total, f"{split} feature maps")
    return fmaps[np.argsort(order)]


def run_segmentation(torso: torso_lib.FrozenTorso, options: Options) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of a linear head on the frozen stride-32 map."""
    root = options.segmentation_directory or options.source.directory
    if not root:
        raise ValueError("--protocol=segmentation needs --dataset_directory (a VOC-layout root).")
    logging.info(
        "segmentation: reading %s at %d px, then %d head epochs",
        root,
        options.seg_image_size,
        options.seg_epochs,
    )
    train_images, train_labels = voc.load_split(root, "train", options.seg_image_size)
    val_images, val_labels = voc.load_split(root, "val", options.seg_image_size)
    if options.seg_label_size:
        train_labels, val_labels = (
            voc.subsample_labels(x, options.seg_label_size) for x in (train_labels, val_labels)
        )
    classes = options.seg_num_classes or voc.num_classes(train_labels, val_labels)
    torso = with_probe_statistics(torso, options, lambda: train_images)
    extractor = features_lib.Extractor(torso, reduce=None)
    per_device = per_device_batch(options.seg_batch_size)

    def progress(epoch: int, loss: float) -> None:
        logging.info("segmentation head: epoch %d/%d loss %.4f", epoch, options.seg_epochs, loss)

    head, shift, scale = segmentation_lib.train_head(
        feature_maps(extractor, train_images, per_device, "train"),
        train_labels,
        classes,
        epochs=options.seg_epochs,
        batch_size=options.seg_batch_size,
        learning_rate=options.seg_learning_rate,
        seed=options.seed,
        on_epoch=progress,
    )
    result = segmentation_lib.evaluate_head(
        head,
        shift,
        scale,
        feature_maps(extractor, val_images, per_device, "val"),
        val_labels,
        classes,
        options.seg_batch_size,
    )
    result.update(
        num_classes=classes,
        image_size=options.seg_image_size,
        label_size=int(val_labels.shape[-1]),
        epochs=options.seg_epochs,
        batch_size=options.seg_batch_size,
        learning_rate=options.seg_learning_rate,
        optimizer="adamw_cosine",
        head="1x1_linear_on_standardised_stride32_map_bilinear_upsampled_logits",
        ignore_label=segmentation_lib.IGNORE_LABEL,
        num_train=len(train_labels),
        num_eval=len(val_labels),
        bn_statistics=options.bn_statistics,
    )
    return result


def _torso_matches(network_params: dict, torso: torso_lib.FrozenTorso) -> bool:
    """Whether a network's torso modules hold exactly `torso`'s parameters."""
    return all(
        module in network_params
        and all(np.array_equal(network_params[module][k], v) for k, v in leaves.items())
        for module, leaves in torso.params.items()
    )


def _agnostic_row(ground_truth: dict, detections: list[dict], per_image: float) -> dict:
    """Class-agnostic AP / AP50 / AR@100 of `detections` and their mean count per image."""
    return {**coco_scoring.score(ground_truth, detections), "boxes_per_image": per_image}


def class_agnostic_baselines(
    ground_truth: dict, data: detection.DetectionSet, with_priors: bool, seed: int
) -> dict[str, dict]:
    """Class-agnostic rows of the val images' region priors (first 30 and all, one rank draw)
    and of uniform random boxes (30 and 100 per image)."""
    rows = {}
    if with_priors:
        logging.info("detection: selective search on %d val images", len(data.stored))
        priors = [region_priors.selective_search(image) for image in data.stored]
        counts = [len(p.boxes) for p in priors]
        top = detection.prior_detections(data, priors, region_priors.TOP_K, seed)
        rows["region_priors_top30"] = _agnostic_row(
            ground_truth, top, float(np.mean(np.minimum(counts, region_priors.TOP_K)))
        )
        every = detection.prior_detections(data, priors, 0, seed)
        rows["region_priors_all"] = _agnostic_row(ground_truth, every, float(np.mean(counts)))
        # AR@100 counts each image's first 100 priors only; this counts them all.
        rows["region_priors_all"]["AR@all"] = coco_scoring.score(
            ground_truth, every, max_dets=max(counts)
        )[f"AR@{max(counts)}"]
    for count in (region_priors.TOP_K, detection.MAX_DETECTIONS):
        boxes = detection.random_detections(data, count, seed)
        rows[f"random_boxes_{count}"] = _agnostic_row(ground_truth, boxes, float(count))
    return rows


def run_detection(subject: Subject, options: Options) -> dict[str, Any]:
    """AP, AP50 and AR@100 of a DETR head trained on the frozen torso's C5 maps; class-agnostic
    AR@100 of the detector before and after training, the region priors and random boxes."""
    root = options.segmentation_directory or options.source.directory
    if not root:
        raise ValueError("--protocol=detection needs --segmentation_directory (a VOC root).")
    train_set, _ = detection.load_split(root, "train", options.det_image_size)
    val_set, val_truth = detection.load_split(root, "val", options.det_image_size)
    if train_set.category_ids != val_set.category_ids:
        raise ValueError(f"{root}: instances_train.json and instances_val.json differ in classes.")
    torso = with_probe_statistics(subject.torso, options, lambda: train_set.images)
    extractor = features_lib.Extractor(torso, reduce=None)
    per_device = per_device_batch(options.det_batch_size)
    train_maps = feature_maps(extractor, train_set.images, per_device, "train")
    val_maps = feature_maps(extractor, val_set.images, per_device, "val")
    num_classes = len(train_set.category_ids)
    source, source_config = None, subject.config
    if options.det_init != "random":
        source, source_config = detection.load_detreg(options.det_init)
    spec = detection.spec_from_config(source_config, num_classes)
    params = detection.init_head(spec, train_maps, train_set.pad_mask, options.seed)
    initial_spec, initial_params = spec, params
    if source is not None:
        params = detection.transfer(params, source)
        # The detector as pretrained, with its own class head (no object last).
        initial_params = detection.head_params(source)
        initial_spec = spec._replace(num_classes=int(source_config["detreg"]["num_classes"]))

    def predict(head_spec: detection.HeadSpec, head: dict) -> tuple[np.ndarray, np.ndarray]:
        return detection.predict(head_spec, head, val_maps, val_set.pad_mask, per_device)

    same_torso = None if source is None else _torso_matches(source, subject.torso)
    if same_torso is False:
        logging.warning("--det_init=%s was trained on another torso.", options.det_init)
    agnostic_truth = coco_scoring.class_agnostic(val_truth)
    objectness = lambda out: detection.objectness_detections(val_set, *out)
    per_image = min(spec.num_queries, detection.MAX_DETECTIONS)
    agnostic = {
        "initial_detector": _agnostic_row(
            agnostic_truth, objectness(predict(initial_spec, initial_params)), per_image
        )
    }

    def progress(step: int, loss: float) -> None:
        logging.info("detection head: step %d/%d loss %.4f", step, options.det_steps, loss)

    trained, final_loss = detection.train_head(
        spec,
        params,
        train_maps,
        train_set,
        steps=options.det_steps,
        batch_size=options.det_batch_size,
        learning_rate=options.det_learning_rate,
        seed=options.seed,
        on_progress=progress,
    )
    outputs = predict(spec, trained)
    result = coco_scoring.score(val_truth, detection.class_detections(val_set, *outputs))
    agnostic["probe"] = _agnostic_row(agnostic_truth, objectness(outputs), per_image)
    agnostic.update(
        class_agnostic_baselines(agnostic_truth, val_set, options.det_region_priors, options.seed)
    )
    result.update(
        class_agnostic=agnostic,
        init=options.det_init,
        transferred=list(detection.TRANSFERRED) if source is not None else [],
        head_torso_is_evaluated_torso=same_torso,
        final_train_loss=final_loss,
        num_classes=num_classes,
        num_queries=spec.num_queries,
        transformer=spec.transformer._asdict(),
        image_size=options.det_image_size,
        steps=options.det_steps,
        batch_size=options.det_batch_size,
        learning_rate=options.det_learning_rate,
        weight_decay=detection.WEIGHT_DECAY,
        clip_norm=detection.CLIP_NORM,
        optimizer="adamw_constant",
        num_train=len(train_set.images),
        num_eval=len(val_set.images),
        bn_statistics=options.bn_statistics,
    )
    return result


@register("knn", needs_labelled_images=True)
def _knn(subject: Subject, options: Options) -> dict[str, Any]:
    return run_knn(subject.extractor, options, subject.torso)


@register("linear", needs_labelled_images=True)
def _linear(subject: Subject, options: Options) -> dict[str, Any]:
    return run_linear(subject.extractor, subject.torso, options)


@register("segmentation", needs_labelled_images=False)
def _segmentation(subject: Subject, options: Options) -> dict[str, Any]:
    return run_segmentation(subject.torso, options)


@register("detection", needs_labelled_images=False)
def _detection(subject: Subject, options: Options) -> dict[str, Any]:
    return run_detection(subject, options)
