"""The probes' settings, defined once: the dataclass the library takes and the flags of
`python -m detcon.evaluate` are both made from the fields below."""

import dataclasses
from typing import Any

from absl import flags

from detcon.data.sources import Source
from detcon.evaluation import knn as knn_lib
from detcon.evaluation import linear_augmented

LINEAR_MODES = ("features", "augmented")
BN_STATISTICS = ("moving", "probe")


def _field(default: Any, help_text: str, **extra: Any) -> Any:
    """A dataclass field whose metadata carries its command-line help (and enum choices)."""
    return dataclasses.field(default=default, metadata=dict(help=help_text, **extra))


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a probe run needs besides the torso; each field but `source` is a flag."""

    source: Source = Source()
    segmentation_directory: str = _field(
        "",
        "VOC-layout root for segmentation and detection when --dataset_directory holds TFRecords.",
    )
    image_size: int = _field(
        224, "Centre-crop size for knn/linear (evaluate: 0 is the pretraining size)."
    )
    batch_size: int = _field(256, "Global batch for feature extraction and linear training.")
    knn_k: int = _field(knn_lib.DEFAULT_K, "Neighbours voting in kNN.")
    knn_temperature: float = _field(knn_lib.DEFAULT_TEMPERATURE, "Vote weight exp(cosine / T).")
    linear_mode: str = _field(
        "features",
        "features: precomputed features + L2 sweep; augmented: BYOL ImageNet protocol.",
        choices=LINEAR_MODES,
    )
    linear_epochs: int = _field(
        linear_augmented.DEFAULT_EPOCHS, "Epochs of --linear_mode=augmented."
    )
    seg_image_size: int = _field(
        512,
        "Longer side after resizing; padded square (x32). evaluate: 0 fits the dataset's "
        "images (their longest side rounded up to x32).",
    )
    seg_label_size: int = _field(
        0,
        "Side the labels are scored at (0: --seg_image_size; must divide it). Set it to the "
        "images' own side when small images are enlarged for the torso.",
    )
    seg_epochs: int = _field(30, "Epochs of the segmentation head.")
    seg_batch_size: int = _field(16, "Batch of the segmentation head.")
    seg_learning_rate: float = _field(1e-3, "Peak AdamW learning rate of the segmentation head.")
    seg_num_classes: int = _field(0, "Classes (0: 1 + largest index in the labels).")
    bn_statistics: str = _field(
        "moving",
        "moving: BatchNorm uses the checkpoint's moving averages; probe: statistics recomputed "
        "on each probe's training images (the same rule for trained and untrained torsos).",
        choices=BN_STATISTICS,
    )
    det_image_size: int = _field(
        256,
        "Detection: longer side the images are resized to, padded square (x32); 256 gives the "
        "64 px scenes an 8 x 8 C5 map.",
    )
    det_steps: int = _field(1000, "Detection: training steps of the DETR head.")
    det_batch_size: int = _field(8, "Detection: batch of the DETR head.")
    det_learning_rate: float = _field(1e-4, "Detection: AdamW rate of the DETR head (DETR's).")
    det_init: str = _field(
        "random",
        "Detection: 'random', or a DETReg run (workdir or step dir) whose input projection, "
        "queries, transformer and box head start the head (its class head is always new).",
    )
    det_region_priors: bool = _field(
        True,
        "Detection: also score the val images' own selective-search region priors "
        "class-agnostically (~0.5 s per image).",
    )
    seed: int = _field(0, "Seed of the random init, splits and shuffles.")


_DEFINE = {
    str: flags.DEFINE_string,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_bool,
}


def _flag_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Options) if f.name != "source"]


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, **defaults: Any) -> None:
    """Defines one flag per Options field (but `source`); `defaults` replaces field defaults."""
    for f in _flag_fields():
        default = defaults.get(f.name, f.default)
        if "choices" in f.metadata:
            flags.DEFINE_enum(
                f.name,
                default,
                list(f.metadata["choices"]),
                f.metadata["help"],
                flag_values=flag_values,
            )
        else:
            _DEFINE[f.type](f.name, default, f.metadata["help"], flag_values=flag_values)


def from_flags(
    source: Source, flag_values: flags.FlagValues = flags.FLAGS, **overrides: Any
) -> Options:
    """Options from the parsed flags of define_flags, the given source and any overrides."""
    values = {f.name: flag_values[f.name].value for f in _flag_fields()}
    return Options(source=source, **{**values, **overrides})
