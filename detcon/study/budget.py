"""One budget for every method: each method's own recipe, resized to the study's scale.

Each recipe keeps its optimiser (LARS or SGD), base learning rate, weight decay, temperatures,
target EMA or momentum, augmentations and loss weights. The budget sets, the same for all:
- steps, batch, ResNet depth and image size;
- how the peak rate follows the batch: the recipes scale it linearly (base x batch / 256), a
  rule for long runs at large batches. The default 'recipe_sqrt' scales the published run's
  peak (base x the recipe's own batch / 256: 3.2 for BYOL and DetCon-B at 4096, 0.03 for MoCo
  v2 at 256) by sqrt(B / the recipe's batch), SimCLR's small-batch rule (0.075 x sqrt(B)
  reaches its 4.8 at 4096): 0.28 for BYOL at batch 32. 'recipe' keeps the published peak
  itself (under LARS a step then moves each layer by the published fraction of its norm), but
  at batch 32 that collapsed the features of the LARS recipes within a few hundred steps
  (docs/study.md, diagnosis). 'none' (every method at its batch-256 rate) gives the LARS
  recipes 1/16 of theirs, and their torsos stayed at random-init level in 100 steps;
- the warm-up as a fraction of the steps (the recipes count it in ImageNet epochs: 10 of 1000
  for BYOL, DetCon and SimCLR, none for the MoCo family);
- head widths times the torso's feature width over ResNet-50's 2048 (the recipes' 4096/2048
  hidden layers are sized for ResNet-50);
- MoCo-family queues of a fixed number of batches (a queue must hold whole batches);
- optionally (target_horizon > 0) the target EMA or key momentum capped so that its time
  constant 1 / (1 - m) is at most target_horizon x steps: MoCo's 0.999 averages over ~1000
  steps, longer than a few-hundred-step run, so its key encoder would stay near its random init;
- DetCo's jigsaw cell at 32 px, the smallest that still gives a stride-32 torso one position.
"""

import dataclasses
import importlib

import ml_collections

from detcon import methods as methods_lib
from detcon.models import networks

# The recipes' head widths are for ResNet-50, whose torso ends with 2048 channels.
_RECIPE_FEATURE_WIDTH = 2048
_MIN_PATCH_SIZE = 32  # a stride-32 torso needs a 32 px cell for one output position
LR_BATCH_SCALINGS = ("recipe", "recipe_sqrt", "none", "sqrt", "linear")


@dataclasses.dataclass(frozen=True)
class Budget:
    """The settings every method of the study shares."""

    steps: int = 100
    batch_size: int = 32
    depth: int = 10
    image_size: int = 64
    warmup_fraction: float = 0.05
    queue_batches: int = 16  # MoCo-family queue = queue_batches x batch_size
    # peak = base x: recipe batch/256 'recipe', sqrt(B x recipe batch)/256 'recipe_sqrt',
    # 1 'none', sqrt(B/256) 'sqrt', B/256 'linear'
    lr_batch_scaling: str = "recipe_sqrt"
    target_horizon: float = 0.0  # > 0: cap 1 / (1 - EMA or momentum) at this fraction of steps
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.queue_batches < 1:
            raise ValueError(
                f"--steps={self.steps}, --batch_size={self.batch_size} and "
                f"--queue_batches={self.queue_batches} must be >= 1."
            )
        if self.depth not in networks.RESNET_DEPTHS:
            raise ValueError(
                f"--depth={self.depth}: choose one of {sorted(networks.RESNET_DEPTHS)}."
            )
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(
                f"--image_size={self.image_size} must be a positive multiple of 32 "
                "(the torso's stride)."
            )
        if self.lr_batch_scaling not in LR_BATCH_SCALINGS:
            raise ValueError(
                f"--lr_batch_scaling={self.lr_batch_scaling!r}: choose one of "
                f"{', '.join(LR_BATCH_SCALINGS)}."
            )
        if self.target_horizon < 0:
            raise ValueError(
                f"--target_horizon={self.target_horizon} must be >= 0 (0: the "
                "recipes' EMA and momentum)."
            )
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"--warmup_fraction={self.warmup_fraction} must be in [0, 1).")


def head_scale(depth: int) -> float:
    """Factor from the recipes' ResNet-50 head widths to those of a ResNet-`depth` torso."""
    return networks.stage_channels(depth)[-1] / _RECIPE_FEATURE_WIDTH


def base_rate_factor(lr_batch_scaling: str, batch_size: int, recipe_batch_size: int) -> float:
    """Factor on the recipe's base rate so that its B/256 schedule gives the chosen peak."""
    ratio = 256.0 / batch_size
    return {
        "recipe": recipe_batch_size / batch_size,
        # The published peak x sqrt(B / its batch): SimCLR's rule for small batches (its
        # appendix B.1, 0.075 x sqrt(B) under LARS), applied from every recipe's own run.
        "recipe_sqrt": (recipe_batch_size / batch_size) ** 0.5,
        "none": ratio,
        "sqrt": ratio**0.5,
        "linear": 1.0,
    }[lr_batch_scaling]


def capped_decay(decay: float, steps: int, horizon: float) -> float:
    """`decay` lowered, if needed, to a time constant 1 / (1 - decay) of horizon x steps."""
    if horizon <= 0:
        return decay
    return min(decay, max(0.0, 1.0 - 1.0 / (horizon * steps)))


def method_config(
    method: str, budget: Budget, dataset_directory: str, num_classes: int
) -> ml_collections.ConfigDict:
    """configs/<method>.py under `budget`, reading the pretraining TFRecords of a directory."""
    c = importlib.import_module(f"configs.{method}").get_config()
    settings = c[method]
    scale = head_scale(budget.depth)
    methods_lib.get(method).resize(
        settings,
        methods_lib.HeadSizes(
            hidden=lambda width: round(width * scale),
            queue_size=budget.queue_batches * budget.batch_size,
            patch_size=_MIN_PATCH_SIZE,
        ),
    )
    for field in ("base_ema", "momentum"):
        if field in settings:
            settings[field] = capped_decay(settings[field], budget.steps, budget.target_horizon)
    c.model.depth = budget.depth
    c.model.num_classes = num_classes  # the online probe only; it never reaches the torso
    c.data.dataset_directory = dataset_directory
    c.data.image_size = budget.image_size
    c.data.num_train_examples = -1  # counted from the records
    c.data.seed = budget.seed
    c.optim.base_learning_rate *= base_rate_factor(
        budget.lr_batch_scaling, budget.batch_size, c.training.batch_size
    )
    c.optim.warmup_rule = "fraction"
    c.optim.warmup_fraction = budget.warmup_fraction
    c.training.batch_size = budget.batch_size
    c.training.max_steps = budget.steps
    c.training.seed = budget.seed
    c.training.log_every_steps = max(1, budget.steps // 50)
    c.training.checkpoint_every_steps = max(1, budget.steps // 4)
    c.training.keep_checkpoints = 1
    return c
