"""Offline evaluation of a pretrained (or randomly initialised) torso: kNN, linear, segmentation,
detection.

  python -m detcon.evaluate --checkpoint=/ckpt/detcon_b --protocol=knn,linear \\
      --dataset_directory=/data/imagenet-fh --output=/ckpt/detcon_b/eval.json
  python -m detcon.evaluate --checkpoint=/ckpt/detcon_b --protocol=segmentation \\
      --dataset_directory=/data/VOCdevkit/VOC2012 --output=voc.json
  python -m detcon.evaluate --checkpoint=/ckpt/detreg --protocol=detection \\
      --segmentation_directory=/data/scenes/voc --det_init=/ckpt/detreg --output=det.json
  python -m detcon.evaluate --random_init --config=configs/detcon_b.py --protocol=knn \\
      --tfds_name=cifar10 --tfds_data_dir=/data/tfds --image_size=32 --output=random.json

The results file maps each protocol to its metrics and settings: {"knn": {"top1": ...}, ...}.
"""

import json
import os
import signal
from typing import Any, Callable, Optional

from absl import app, flags, logging
from ml_collections import config_flags

from detcon import cli, errors
from detcon.evaluation import options as options_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Pretraining config (with --random_init) for the torso's architecture."
)
flags.DEFINE_string(
    "checkpoint",
    None,
    "A pretraining workdir, its checkpoints/, a step dir, or "
    "a torso weights file (.npz export, DeepMind .npy/.pkl with --allow_pickle).",
)
flags.DEFINE_bool(
    "allow_pickle",
    False,
    "Permit a pickled .npy/.pkl --checkpoint (unpickling "
    "executes code stored in the file: only for files from a source you trust).",
)
flags.DEFINE_bool("random_init", False, "Evaluate an untrained torso built from --config.")
flags.DEFINE_enum("network", "online", ["online", "target"], "Which network's torso to evaluate.")
flags.DEFINE_list(
    "protocol",
    ["knn"],
    "Comma-separated protocol names: knn, linear, "
    "segmentation, detection (detcon.evaluation.protocols.PROTOCOLS).",
)
flags.DEFINE_string(
    "dataset_directory",
    None,
    "TFRecords (train/validation shards) for knn/linear; a PASCAL VOC-layout root "
    "for segmentation and detection.",
)
flags.DEFINE_string("tfds_name", None, "TFDS dataset for knn/linear (imagenet2012, cifar10, ...).")
flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir; the dataset must already be there.")
flags.DEFINE_string("tfds_train_split", "train", "TFDS split to fit on.")
flags.DEFINE_string(
    "tfds_eval_split", "", "TFDS split to report on (default validation, else test)."
)
flags.DEFINE_string("output", None, "Results JSON path (written atomically).")
# The probes' own settings: one flag per field of detcon.evaluation.options.Options.
options_lib.define_flags(image_size=0, seg_label_size=0, seg_image_size=0)
FLAGS = flags.FLAGS


def parse_protocols(values: list[str]) -> list[str]:
    """Validated protocol names in the given order, duplicates removed."""
    from detcon.evaluation import protocols

    names = list(dict.fromkeys(v.strip() for v in values if v.strip()))
    unknown = [n for n in names if n not in protocols.PROTOCOLS]  # the registry
    if unknown or not names:
        raise app.UsageError(
            f"--protocol={','.join(values)}: choose from "
            f"{','.join(protocols.PROTOCOLS)} (comma-separated)."
        )
    return names


def load_torso(
    checkpoint: str | None,
    network: str,
    random_init: bool,
    config: Any,
    seed: int,
    allow_pickle: bool = False,
) -> tuple[Any, dict]:
    """(FrozenTorso, pretraining config dict; {} for a weights file) from a checkpoint or a
    torso file, or freshly initialised."""
    from detcon.evaluation import features

    if random_init:
        config_dict = config.to_dict()
        torso = features.random_init(config.model.depth, config.model.width_multiplier, seed)
        return torso, config_dict
    from detcon.weights import torso as torso_lib

    loaded = torso_lib.load(checkpoint, network, allow_pickle=allow_pickle)
    return loaded.torso, loaded.config


def run(
    torso: Any,
    protocol_names: list[str],
    options: Any,
    on_result: Optional[Callable[[str, dict], None]] = None,
    config: Optional[dict] = None,
) -> dict[str, dict]:
    """Runs each named protocol on the frozen torso; returns {protocol: metrics and settings}.

    on_result(name, metrics) is called as each protocol finishes (e.g. to save it at once);
    config is the torso's run config (the detection head's sizes come from a DETReg run's).
    """
    from detcon.evaluation import protocols

    subject = protocols.Subject(torso, config)
    results = {}
    for name in protocol_names:
        logging.info("%s: running (%d of %d)", name, len(results) + 1, len(protocol_names))
        results[name] = protocols.get(name).run(subject, options)
        if on_result is not None:
            on_result(name, results[name])
    return results


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived during evaluation."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


def _raise_interrupted(signal_number: int, frame: object) -> None:
    del frame
    raise Interrupted(signal_number)


def summary_line(results: dict[str, dict]) -> str:
    """One line of headline numbers, e.g. 'knn top1 0.512 | segmentation mIoU 0.413 ...'."""
    parts = []
    for name, metrics in results.items():
        if name == "segmentation":
            parts.append(
                f"segmentation mIoU {metrics['miou']:.4f} pixel accuracy "
                f"{metrics['pixel_accuracy']:.4f}"
            )
        elif name == "detection":
            parts.append(
                f"detection AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f} "
                f"AR@100 {metrics['AR@100']:.4f}"
            )
        else:
            top5 = f" top5 {metrics['top5']:.4f}" if "top5" in metrics else ""
            parts.append(f"{name} top1 {metrics['top1']:.4f}{top5}")
    return " | ".join(parts)


def write_results(path: str, document: dict) -> None:
    """Writes the results JSON atomically (temp file + rename)."""
    from detcon.weights import atomic

    atomic.write_text(path, json.dumps(document, indent=2, sort_keys=True) + "\n")


def _check_flags() -> None:
    """Flag errors before any data is read or anything compiled."""
    if FLAGS.random_init == bool(FLAGS.checkpoint):
        raise app.UsageError("Give exactly one of --checkpoint=WORKDIR|STEPDIR or --random_init.")
    if FLAGS.random_init and _CONFIG.value is None:
        raise app.UsageError("--random_init needs --config=configs/<method>.py for the torso.")
    if not FLAGS.output:
        raise app.UsageError("--output=R.json is required.")
    from detcon.evaluation import protocols

    names = parse_protocols(FLAGS.protocol)
    needs_images = any(protocols.get(n).needs_labelled_images for n in names)
    if needs_images and not (FLAGS.dataset_directory or FLAGS.tfds_name):
        raise app.UsageError(
            "--protocol=knn/linear need --dataset_directory (TFRecords) or --tfds_name."
        )
    if needs_images and FLAGS.dataset_directory and FLAGS.tfds_name:
        raise app.UsageError("Give --dataset_directory or --tfds_name for knn/linear, not both.")
    needs_root = not all(protocols.get(n).needs_labelled_images for n in names)
    if needs_root and not (FLAGS.segmentation_directory or FLAGS.dataset_directory):
        raise app.UsageError(
            "--protocol=segmentation/detection need --dataset_directory or "
            "--segmentation_directory (VOC layout)."
        )
    if FLAGS.seg_image_size % 32 or FLAGS.seg_image_size < 0:
        raise app.UsageError(
            f"--seg_image_size={FLAGS.seg_image_size} must be a positive multiple of 32 "
            "(0: fit the dataset's images)."
        )
    if FLAGS.seg_label_size < 0 or (
        FLAGS.seg_label_size
        and FLAGS.seg_image_size
        and FLAGS.seg_image_size % FLAGS.seg_label_size
    ):
        raise app.UsageError(
            f"--seg_label_size={FLAGS.seg_label_size} must divide "
            f"--seg_image_size={FLAGS.seg_image_size} (0: score at that size)."
        )
    if FLAGS.batch_size < 1 or FLAGS.seg_batch_size < 1 or FLAGS.knn_k < 1:
        raise app.UsageError("--batch_size, --seg_batch_size and --knn_k must be >= 1.")
    if FLAGS.det_image_size <= 0 or FLAGS.det_image_size % 32:
        raise app.UsageError(
            f"--det_image_size={FLAGS.det_image_size} must be a positive multiple of 32."
        )
    if FLAGS.det_steps < 0 or FLAGS.det_batch_size < 1:
        raise app.UsageError("--det_steps must be >= 0 and --det_batch_size >= 1.")
    if "detection" in names:
        from detcon.evaluation import detection

        root = FLAGS.segmentation_directory or FLAGS.dataset_directory
        for split in ("train", "val"):
            try:
                detection.read_instances(root, split, check_only=True)
            except FileNotFoundError as error:
                raise app.UsageError(str(error)) from None


def _seg_image_size(protocol_names: list[str]) -> int:
    """--seg_image_size, or (0) the size that fits the VOC root's training images."""
    if FLAGS.seg_image_size or "segmentation" not in protocol_names:
        return FLAGS.seg_image_size or options_lib.Options.seg_image_size
    from detcon.evaluation import voc

    size = voc.fitting_image_size(FLAGS.segmentation_directory or FLAGS.dataset_directory)
    logging.info("segmentation input size %d px (fits the dataset; --seg_image_size sets it)", size)
    return size


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _check_flags()
    if FLAGS.checkpoint and not os.path.exists(FLAGS.checkpoint):
        raise app.UsageError(f"--checkpoint={FLAGS.checkpoint} does not exist.")
    names = parse_protocols(FLAGS.protocol)
    cli.quiet_library_logs()
    document: dict[str, Any] = {}
    previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        for number in previous:
            signal.signal(number, _raise_interrupted)
        _evaluate(names, document)
    except Interrupted as stop:
        finished = [n for n in names if n in document]
        left = [n for n in names if n not in document]
        if document:
            write_results(FLAGS.output, {**document, "unfinished": left})
        cli.fail(
            f"stopped by {stop}; "
            + (
                f"kept {','.join(finished)} in {FLAGS.output}; "
                if finished
                else "nothing finished; "
            )
            + f"run again with --protocol={','.join(left)} to finish",
            128 + stop.signal_number,
        )
    except (ValueError, FileNotFoundError, errors.RunStopped) as error:
        # These carry a message meant for the user (a bad checkpoint, a dataset without labels).
        cli.fail(str(error), 1)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _evaluate(names: list[str], document: dict[str, Any]) -> None:
    """Loads the torso and runs `names`, writing `document` to --output after each protocol."""
    from detcon.data import labelled

    torso, pretrain_config = load_torso(
        FLAGS.checkpoint,
        FLAGS.network,
        FLAGS.random_init,
        _CONFIG.value,
        FLAGS.seed,
        FLAGS.allow_pickle,
    )
    image_size = FLAGS.image_size or int(pretrain_config.get("data", {}).get("image_size", 224))
    source = labelled.Source(
        directory="" if FLAGS.tfds_name else (FLAGS.dataset_directory or ""),
        tfds_name=FLAGS.tfds_name or "",
        tfds_data_dir=FLAGS.tfds_data_dir,
        tfds_train_split=FLAGS.tfds_train_split,
        tfds_eval_split=FLAGS.tfds_eval_split,
    )
    options = options_lib.from_flags(
        source, image_size=image_size, seg_image_size=_seg_image_size(names)
    )
    header = {
        "checkpoint": os.path.abspath(FLAGS.checkpoint) if FLAGS.checkpoint else None,
        "random_init": FLAGS.random_init,
        "network": FLAGS.network,
        "method": pretrain_config.get("method"),
        "model": {"depth": torso.depth, "width_multiplier": torso.width_multiplier},
    }

    def save(name: str, metrics: dict) -> None:
        document.update(header)
        document[name] = metrics
        write_results(FLAGS.output, document)
        logging.info("%s finished -> %s", name, FLAGS.output)

    results = run(torso, names, options, on_result=save, config=pretrain_config)
    line = summary_line(results)
    logging.info("%s -> %s", line, FLAGS.output)
    print(f"{line} -> {FLAGS.output}", flush=True)


if __name__ == "__main__":
    app.run(main)
