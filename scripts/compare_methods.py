r"""Pretrains every registered method under one budget on the scenes and compares their probes.

    python scripts/compare_methods.py --output_directory=/tmp/study    # ~1 h on 2 CPU cores
    python scripts/compare_methods.py --output_directory=/tmp/study_big --methods=byol,detcon_b \
        --steps=1000 --batch_size=128 --depth=18 --image_size=128
    python scripts/compare_methods.py --output_directory=/tmp/curves --methods=detcon_b,byol \
        --steps=400 --eval_at_steps=0,100,200,400 --seeds=0,1,2     # curves, mean ± std

Builds the scenes under --scenes_directory if missing (scripts/make_scenes.py's defaults), trains
each method into <output>/runs/<method>, probes its online torso (kNN on the single-object split,
linear segmentation on the VOC scenes, enlarged 4x and scored at their own side) and the
random-init torso, and writes compare.json, compare.md and compare.png. Finished methods are
reused on a re-run; see detcon/study/budget.py for what the budget sets and what stays each
recipe's own, and docs/study.md for the measured default.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from detcon import cli, errors
from detcon.data.build import scenes
from detcon.study import budget as budget_lib
from detcon.study import compare, runner
from detcon.study import stop as study_stop

_DEFAULT = budget_lib.Budget()
_OUTPUT = flags.DEFINE_string("output_directory", None, "Where runs, results and reports go.")
_SCENES = flags.DEFINE_string(
    "scenes_directory", None, "Scenes root (default <output_directory>/scenes; built if missing)."
)
_METHODS = flags.DEFINE_list("methods", [], "Comma-separated methods (default: all registered).")
_STEPS = flags.DEFINE_integer("steps", _DEFAULT.steps, "Pretraining steps of every method.")
_BATCH = flags.DEFINE_integer("batch_size", _DEFAULT.batch_size, "Global pretraining batch.")
_DEPTH = flags.DEFINE_integer("depth", _DEFAULT.depth, "ResNet depth (10, 18, 34, 50, ...).")
_IMAGE = flags.DEFINE_integer("image_size", _DEFAULT.image_size, "Pretraining crop side, pixels.")
_WARMUP = flags.DEFINE_float(
    "warmup_fraction",
    _DEFAULT.warmup_fraction,
    "Linear warm-up, fraction of the steps (the same for all methods).",
)
_QUEUE = flags.DEFINE_integer(
    "queue_batches", _DEFAULT.queue_batches, "MoCo-family queue length in batches."
)
_LR_SCALING = flags.DEFINE_enum(
    "lr_batch_scaling",
    _DEFAULT.lr_batch_scaling,
    list(budget_lib.LR_BATCH_SCALINGS),
    "Peak lr = recipe base x (recipe batch/256 recipe: the published run's peak | "
    "sqrt(B x recipe batch)/256 recipe_sqrt: that peak x sqrt(B/recipe batch) | 1 none | "
    "sqrt(B/256) sqrt | B/256 linear), the same rule for all.",
)
_HORIZON = flags.DEFINE_float(
    "target_horizon",
    _DEFAULT.target_horizon,
    "> 0: cap every target EMA / key momentum m so that 1/(1-m) <= this x --steps (0: recipes').",
)
_SEED = flags.DEFINE_integer(
    "seed", _DEFAULT.seed, "Seed of the scenes (and of training and probes without --seeds)."
)
_SEEDS = flags.DEFINE_list(
    "seeds",
    [],
    "Training and probe seeds, e.g. 0,1,2: every method (and random init) runs "
    "once per seed; tables give mean ± std (default: --seed).",
)
_EVAL_AT = flags.DEFINE_list(
    "eval_at_steps",
    [],
    "Pretraining steps at which each run's online torso is probed, e.g. "
    "0,100,300,1000 (0: the method's own initialisation; the last step always). Writes each "
    "entry's `curve` and curves.png.",
)
_SEG_SIZE = flags.DEFINE_integer(
    "seg_image_size",
    256,
    "Segmentation probe input side (multiple of 32): the 64 px scenes "
    "enlarged 4x give the stride-32 torso an 8x8 map.",
)
_SEG_LABEL_SIZE = flags.DEFINE_integer(
    "seg_label_size",
    0,
    "Side the segmentation labels are scored at (0: the scenes' own side, "
    "so the enlarged labels are the original ones).",
)
_SEG_EPOCHS = flags.DEFINE_integer("seg_epochs", 30, "Epochs of the segmentation head.")
_BN = flags.DEFINE_enum(
    "probe_bn_statistics",
    "probe",
    ["moving", "probe"],
    "BatchNorm statistics of every probed torso: probe (recomputed on each probe's training "
    "images, one rule for trained and untrained torsos) or moving (the checkpoint's: running "
    "averages of the last augmented pretraining batches, the identity for random init).",
)
_NUM_PRETRAIN = flags.DEFINE_integer(
    "num_pretrain_scenes",
    scenes.SceneDatasetSpec().num_pretrain,
    "Pretraining scenes built (and read); probe sets are unchanged.",
)


def main(argv: list[str]) -> None:
    try:
        with study_stop.stop_on_signals():
            _main(argv)
    except errors.Preempted as stop:
        cli.fail(study_stop.resume_hint(os.path.abspath(_OUTPUT.value), stop), stop.exit_code)


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _SEG_SIZE.value < 32 or _SEG_SIZE.value % 32:
        raise app.UsageError(
            f"--seg_image_size={_SEG_SIZE.value} must be a positive multiple of 32."
        )
    try:
        budget = budget_lib.Budget(
            steps=_STEPS.value,
            batch_size=_BATCH.value,
            depth=_DEPTH.value,
            image_size=_IMAGE.value,
            warmup_fraction=_WARMUP.value,
            queue_batches=_QUEUE.value,
            lr_batch_scaling=_LR_SCALING.value,
            target_horizon=_HORIZON.value,
            seed=_SEED.value,
        )
        methods = compare.check_methods(_METHODS.value)
        seeds = [int(s) for s in _SEEDS.value] or [_SEED.value]
        eval_at_steps = [int(s) for s in _EVAL_AT.value]
        runner.check_eval_steps(budget.steps, eval_at_steps)
        spec = scenes.SceneDatasetSpec(seed=_SEED.value, num_pretrain=_NUM_PRETRAIN.value)
        compare.seg_label_side(_SEG_SIZE.value, _SEG_LABEL_SIZE.value, spec)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    output = os.path.abspath(_OUTPUT.value)
    scenes_directory = _SCENES.value or os.path.join(output, "scenes")
    document = compare.run(
        methods,
        budget,
        scenes_directory,
        output,
        spec=spec,
        seg_image_size=_SEG_SIZE.value,
        seg_label_size=_SEG_LABEL_SIZE.value,
        seg_epochs=_SEG_EPOCHS.value,
        seeds=seeds,
        eval_at_steps=eval_at_steps,
        bn_statistics=_BN.value,
    )
    print(open(os.path.join(output, compare.TABLE_NAME)).read())
    print(
        f"{len(document['methods'])} methods in {document['wall_seconds_this_run']:.0f} s -> "
        f"{os.path.join(output, compare.JSON_NAME)}"
    )


if __name__ == "__main__":
    flags.mark_flag_as_required("output_directory")
    app.run(main)
