r"""Writes the synthetic-scenes dataset: pretraining shards with FH masks, a VOC set, a kNN split.

    python scripts/make_scenes.py --output_directory=/data/scenes --seed=0

Writes `pretrain/` (TFRecords with FH masks, the real-data schema), `voc/` (PASCAL VOC layout with
ground-truth shape classes) and `classification/` (one object per image, label = shape) under
--output_directory; see detcon/data/build/scenes.py.  Same flags, same bytes: a re-run with the same
flags returns at once, one with other flags is refused.  `voc/instances_{train,val}.json` hold the
VOC scenes' objects COCO-style (boxes, classes, masks); `--region_priors` adds DETReg's
selective-search regions to the pretraining records.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from detcon.data import pipeline
from detcon.data.build import mask_job, scene_render, scenes

_DEFAULT_SPEC = scenes.SceneDatasetSpec()
_DEFAULT_SCENE = scene_render.SceneParams()

_OUTPUT_DIRECTORY = flags.DEFINE_string("output_directory", None, "Where the dataset is written.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every image; equal seeds give equal bytes.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", _DEFAULT_SCENE.image_size, "Image side, pixels.")
_MIN_OBJECTS = flags.DEFINE_integer(
    "min_objects", _DEFAULT_SCENE.min_objects, "Fewest objects per scene."
)
_MAX_OBJECTS = flags.DEFINE_integer(
    "max_objects", _DEFAULT_SCENE.max_objects, "Most objects per scene."
)
_MIN_RADIUS = flags.DEFINE_float(
    "min_radius", _DEFAULT_SCENE.min_radius, "Smallest object radius, fraction of the image side."
)
_MAX_RADIUS = flags.DEFINE_float(
    "max_radius", _DEFAULT_SCENE.max_radius, "Largest object radius, fraction of the image side."
)
_NUM_PRETRAIN = flags.DEFINE_integer(
    "num_pretrain", _DEFAULT_SPEC.num_pretrain, "Pretraining scenes."
)
_NUM_VOC_TRAIN = flags.DEFINE_integer(
    "num_voc_train", _DEFAULT_SPEC.num_voc_train, "VOC train scenes (segmentation probe fit)."
)
_NUM_VOC_VAL = flags.DEFINE_integer(
    "num_voc_val", _DEFAULT_SPEC.num_voc_val, "VOC val scenes (segmentation probe score)."
)
_NUM_CLASSIFICATION_TRAIN = flags.DEFINE_integer(
    "num_classification_train",
    _DEFAULT_SPEC.num_classification_train,
    "Single-object train images (kNN bank).",
)
_NUM_CLASSIFICATION_VAL = flags.DEFINE_integer(
    "num_classification_val",
    _DEFAULT_SPEC.num_classification_val,
    "Single-object validation images (kNN queries).",
)
_PRETRAIN_SHARDS = flags.DEFINE_integer(
    "pretrain_shards", _DEFAULT_SPEC.pretrain_shards, "Shards of the pretraining split."
)
_CLASSIFICATION_SHARDS = flags.DEFINE_integer(
    "classification_shards",
    _DEFAULT_SPEC.classification_shards,
    "Shards of each classification split.",
)
_FH_SCALES = flags.DEFINE_string(
    "fh_scales", None, "Comma-separated FH scales (default 200, tuned for these scenes)."
)
_FH_MIN_SIZES = flags.DEFINE_string(
    "fh_min_sizes", None, "Comma-separated FH minimum sizes (default 30 pixels at 64 px, by area)."
)


_REGION_PRIORS = flags.DEFINE_boolean(
    "region_priors",
    False,
    "Also store DETReg's selective-search region priors in the pretraining records "
    "(for --config=configs/detreg.py; ~0.4 s per scene on one core).",
)


def _fh_params() -> mask_job.FhParams | None:
    if _FH_SCALES.value is None and _FH_MIN_SIZES.value is None:
        return None
    if _FH_SCALES.value is None or _FH_MIN_SIZES.value is None:
        raise app.UsageError("give both --fh_scales and --fh_min_sizes, or neither")
    try:
        scales = tuple(float(v) for v in _FH_SCALES.value.split(",") if v.strip())
        min_sizes = tuple(int(v) for v in _FH_MIN_SIZES.value.split(",") if v.strip())
    except ValueError:
        raise app.UsageError(
            "--fh_scales and --fh_min_sizes must be comma-separated numbers"
        ) from None
    return mask_job.FhParams(scales, min_sizes)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        spec = scenes.SceneDatasetSpec(
            seed=_SEED.value,
            scene=scene_render.SceneParams(
                image_size=_IMAGE_SIZE.value,
                min_objects=_MIN_OBJECTS.value,
                max_objects=_MAX_OBJECTS.value,
                min_radius=_MIN_RADIUS.value,
                max_radius=_MAX_RADIUS.value,
            ),
            num_pretrain=_NUM_PRETRAIN.value,
            num_voc_train=_NUM_VOC_TRAIN.value,
            num_voc_val=_NUM_VOC_VAL.value,
            num_classification_train=_NUM_CLASSIFICATION_TRAIN.value,
            num_classification_val=_NUM_CLASSIFICATION_VAL.value,
            pretrain_shards=_PRETRAIN_SHARDS.value,
            classification_shards=_CLASSIFICATION_SHARDS.value,
            fh=_fh_params(),
            region_priors=_REGION_PRIORS.value,
        )
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    start = time.perf_counter()
    try:
        directory = scenes.build(
            spec, _OUTPUT_DIRECTORY.value, progress=lambda part: print(f"writing {part} ...")
        )
    except ValueError as error:  # an output directory holding other data
        raise app.UsageError(str(error)) from None
    pretrain = os.path.join(directory, scenes.PRETRAIN_DIRECTORY)
    print(
        f"{directory}: {pipeline.num_examples(pretrain, 'train')} pretraining scenes, "
        f"{spec.num_voc_train}/{spec.num_voc_val} VOC train/val scenes, "
        f"{spec.num_classification_train}/{spec.num_classification_val} single-object "
        f"train/validation images, classes {scenes.class_names()} "
        f"({time.perf_counter() - start:.1f} s)"
    )


if __name__ == "__main__":
    flags.mark_flag_as_required("output_directory")
    app.run(main)
