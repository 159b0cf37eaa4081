"""Offline evaluation of a pretrained (or randomly initialised) torso: kNN, linear, segmentation.

  python -m detcon.evaluate --checkpoint=/ckpt/detcon_b --protocol=knn,linear \\
      --dataset_directory=/data/imagenet-fh --output=/ckpt/detcon_b/eval.json
  python -m detcon.evaluate --checkpoint=/ckpt/detcon_b --protocol=segmentation \\
      --dataset_directory=/data/VOCdevkit/VOC2012 --output=voc.json
  python -m detcon.evaluate --random_init --config=configs/detcon_b.py --protocol=knn \\
      --tfds_name=cifar10 --tfds_data_dir=/data/tfds --image_size=32 --output=random.json

The results file maps each protocol to its metrics and settings: {"knn": {"top1": ...}, ...}.
"""
import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Pretraining config (with --random_init) for the torso's architecture.")
flags.DEFINE_string("checkpoint", None, "A pretraining workdir, its checkpoints/ or a step dir.")
flags.DEFINE_bool("random_init", False, "Evaluate an untrained torso built from --config.")
flags.DEFINE_enum("network", "online", ["online", "target"], "Which network's torso to evaluate.")
flags.DEFINE_list("protocol", ["knn"], "Comma-separated: knn, linear, segmentation.")
flags.DEFINE_string("dataset_directory", None,
                    "TFRecords (train/validation shards) for knn/linear; a PASCAL VOC-layout root "
                    "for segmentation.")
flags.DEFINE_string("segmentation_directory", None,
                    "VOC-layout root for segmentation when --dataset_directory holds TFRecords.")
flags.DEFINE_string("tfds_name", None, "TFDS dataset for knn/linear (imagenet2012, cifar10, ...).")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir; the dataset must already be there.")
flags.DEFINE_string("tfds_train_split", "train", "TFDS split to fit on.")
flags.DEFINE_string("tfds_eval_split", "",
                    "TFDS split to report on (default validation, else test).")
flags.DEFINE_string("output", None, "Results JSON path (written atomically).")
flags.DEFINE_integer("image_size", 0, "Centre-crop size for knn/linear (0: the pretraining size).")
flags.DEFINE_integer("batch_size", 256, "Global batch for feature extraction and linear training.")
flags.DEFINE_integer("knn_k", 20, "Neighbours voting in kNN.")
flags.DEFINE_float("knn_temperature", 0.07, "Vote weight exp(cosine / T).")
flags.DEFINE_enum("linear_mode", "features", ["features", "augmented"],
                  "features: precomputed features + L2 sweep; augmented: BYOL ImageNet protocol.")
flags.DEFINE_integer("linear_epochs", 90, "Epochs of --linear_mode=augmented.")
flags.DEFINE_integer("seg_image_size", 512, "Longer side after resizing; padded square (x32).")
flags.DEFINE_integer("seg_label_size", 0,
                     "Side the labels are scored at (0: --seg_image_size; must divide it). Set "
                     "it to the images' own side when small images are enlarged for the torso.")
flags.DEFINE_integer("seg_epochs", 30, "Epochs of the segmentation head.")
flags.DEFINE_integer("seg_batch_size", 16, "Batch of the segmentation head.")
flags.DEFINE_float("seg_learning_rate", 1e-3, "Peak AdamW learning rate of the segmentation head.")
flags.DEFINE_integer("seg_num_classes", 0, "Classes (0: 1 + largest index in the labels).")
flags.DEFINE_integer("seed", 0, "Seed of the random init, splits and shuffles.")
FLAGS = flags.FLAGS


def parse_protocols(values: list[str]) -> list[str]:
    """Validated protocol names in the given order, duplicates removed."""
    from detcon.evaluation import protocols
    names = list(dict.fromkeys(v.strip() for v in values if v.strip()))
    unknown = [n for n in names if n not in protocols.PROTOCOLS]
    if unknown or not names:
        raise app.UsageError(f"--protocol={','.join(values)}: choose from "
                             f"{','.join(protocols.PROTOCOLS)} (comma-separated).")
    return names


def load_torso(checkpoint: str | None, network: str, random_init: bool, config: Any, seed: int
               ) -> tuple[Any, dict]:
    """(FrozenTorso, pretraining config dict) from a checkpoint, or freshly initialised."""
    from detcon.evaluation import features
    if random_init:
        config_dict = config.to_dict()
        torso = features.random_init(config.model.depth, config.model.width_multiplier, seed)
        return torso, config_dict
    from detcon import checkpoint as checkpoint_lib
    params, state, config_dict = checkpoint_lib.load_network(checkpoint, network)
    if "model" not in config_dict:
        raise ValueError(f"--checkpoint={checkpoint}: its metadata holds no config.model; it was "
                         "not written by python -m detcon.main_loop.")
    return features.from_network(params, state, config_dict["model"]), config_dict


def run(torso: Any, protocol_names: list[str], options: Any) -> dict[str, dict]:
    """Runs each protocol on the frozen torso; returns {protocol: metrics and settings}."""
    from detcon.evaluation import features, protocols
    results: dict[str, dict] = {}
    extractor = None
    for name in protocol_names:
        if name in ("knn", "linear") and extractor is None:
            extractor = features.Extractor(torso)
        if name == "knn":
            results[name] = protocols.run_knn(extractor, options)
        elif name == "linear":
            results[name] = protocols.run_linear(extractor, torso, options)
        else:
            results[name] = protocols.run_segmentation(torso, options)
    return results


def summary_line(results: dict[str, dict]) -> str:
    """One line of headline numbers, e.g. 'knn top1 0.512 | segmentation mIoU 0.413 ...'."""
    parts = []
    for name, metrics in results.items():
        if name == "segmentation":
            parts.append(f"segmentation mIoU {metrics['miou']:.4f} pixel accuracy "
                         f"{metrics['pixel_accuracy']:.4f}")
        else:
            top5 = f" top5 {metrics['top5']:.4f}" if "top5" in metrics else ""
            parts.append(f"{name} top1 {metrics['top1']:.4f}{top5}")
    return " | ".join(parts)


def write_results(path: str, document: dict) -> None:
    """Writes the results JSON atomically (temp file + rename)."""
    from detcon import export
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    export.atomic_write(path, lambda f: f.write(text.encode()))


def _check_flags() -> None:
    """Flag errors before any data is read or anything compiled."""
    if FLAGS.random_init == bool(FLAGS.checkpoint):
        raise app.UsageError("Give exactly one of --checkpoint=WORKDIR|STEPDIR or --random_init.")
    if FLAGS.random_init and _CONFIG.value is None:
        raise app.UsageError("--random_init needs --config=configs/<method>.py for the torso.")
    if not FLAGS.output:
        raise app.UsageError("--output=R.json is required.")
    names = parse_protocols(FLAGS.protocol)
    needs_images = {"knn", "linear"} & set(names)
    if needs_images and not (FLAGS.dataset_directory or FLAGS.tfds_name):
        raise app.UsageError("--protocol=knn/linear need --dataset_directory (TFRecords) or "
                             "--tfds_name.")
    if needs_images and FLAGS.dataset_directory and FLAGS.tfds_name:
        raise app.UsageError("Give --dataset_directory or --tfds_name for knn/linear, not both.")
    if "segmentation" in names and not (FLAGS.segmentation_directory or FLAGS.dataset_directory):
        raise app.UsageError("--protocol=segmentation needs --dataset_directory (VOC layout).")
    if FLAGS.seg_image_size % 32 or FLAGS.seg_image_size < 32:
        raise app.UsageError(f"--seg_image_size={FLAGS.seg_image_size} must be a positive "
                             "multiple of 32.")
    if FLAGS.seg_label_size < 0 or (FLAGS.seg_label_size
                                    and FLAGS.seg_image_size % FLAGS.seg_label_size):
        raise app.UsageError(f"--seg_label_size={FLAGS.seg_label_size} must divide "
                             f"--seg_image_size={FLAGS.seg_image_size} (0: score at that size).")
    if FLAGS.batch_size < 1 or FLAGS.seg_batch_size < 1 or FLAGS.knn_k < 1:
        raise app.UsageError("--batch_size, --seg_batch_size and --knn_k must be >= 1.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _check_flags()
    if FLAGS.checkpoint and not os.path.exists(FLAGS.checkpoint):
        raise app.UsageError(f"--checkpoint={FLAGS.checkpoint} does not exist.")
    from detcon.evaluation import datasets, protocols
    torso, pretrain_config = load_torso(FLAGS.checkpoint, FLAGS.network, FLAGS.random_init,
                                        _CONFIG.value, FLAGS.seed)
    image_size = FLAGS.image_size or int(pretrain_config.get("data", {}).get("image_size", 224))
    source = datasets.Source(
        directory="" if FLAGS.tfds_name else (FLAGS.dataset_directory or ""),
        tfds_name=FLAGS.tfds_name or "", tfds_data_dir=FLAGS.tfds_data_dir,
        tfds_train_split=FLAGS.tfds_train_split, tfds_eval_split=FLAGS.tfds_eval_split)
    options = protocols.Options(
        source=source, segmentation_directory=FLAGS.segmentation_directory or "",
        image_size=image_size, batch_size=FLAGS.batch_size, knn_k=FLAGS.knn_k,
        knn_temperature=FLAGS.knn_temperature, linear_mode=FLAGS.linear_mode,
        linear_epochs=FLAGS.linear_epochs, seg_image_size=FLAGS.seg_image_size,
        seg_label_size=FLAGS.seg_label_size, seg_epochs=FLAGS.seg_epochs,
        seg_batch_size=FLAGS.seg_batch_size, seg_learning_rate=FLAGS.seg_learning_rate, seg_num_classes=FLAGS.seg_num_classes,
        seed=FLAGS.seed)
    results = run(torso, parse_protocols(FLAGS.protocol), options)
    document = {
        "checkpoint": os.path.abspath(FLAGS.checkpoint) if FLAGS.checkpoint else None,
        "random_init": FLAGS.random_init, "network": FLAGS.network,
        "method": pretrain_config.get("method"),
        "model": {"depth": torso.depth, "width_multiplier": torso.width_multiplier},
        **results}
    write_results(FLAGS.output, document)
    line = summary_line(results)
    logging.info("%s -> %s", line, FLAGS.output)
    print(f"{line} -> {FLAGS.output}", flush=True)


if __name__ == "__main__":
    app.run(main)
