"""LARS as an optax chain, MoCo's SGD, DETR's AdamW with a frozen torso, the learning-rate
schedules (BYOL/DetCon's warm-up + cosine, DETR's step drop), and the optimiser a config asks
for."""

import functools
from typing import Any, Union

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Haiku parameter names of biases (Linear/Conv 'b') and BatchNorm affine terms: LARS neither
# decays nor trust-ratio-scales them, as in BYOL and DetCon.
_NOT_ADAPTED_PARAM_NAMES = frozenset({"b", "offset", "scale"})


def learning_rate(
    step: Union[int, jax.Array],
    *,
    base_learning_rate: float,
    batch_size: int,
    total_steps: int,
    warmup_steps: int,
) -> jax.Array:
    """Scalar float32 lr: linear warm-up to base*batch/256, then cosine decay to 0 at total."""
    peak = base_learning_rate * batch_size / 256.0
    step = jnp.minimum(jnp.asarray(step, jnp.float32), float(total_steps))
    warmup = peak * step / max(warmup_steps, 1)
    cosine_steps = max(total_steps - warmup_steps, 1)
    progress = (step - warmup_steps) / cosine_steps
    # 0.5 * (1 + cos(pi p)) written as cos(pi p / 2)^2: no float32 cancellation near the end.
    cosine = peak * jnp.square(jnp.cos(0.5 * jnp.pi * progress))
    return jnp.where(step < warmup_steps, warmup, cosine)


def released_warmup_steps(pretrain_epochs: int, num_examples: int, batch_size: int) -> int:
    """Warm-up steps of the released DetCon-B config: (epochs // 100) epochs, floored to steps."""
    return (pretrain_epochs // 100) * num_examples // batch_size


def lars_mask(params: Any) -> Any:
    """Bool pytree like params: True where LARS decays and trust-ratio scales ('w'), False for
    biases and BatchNorm affine terms ('b', 'offset', 'scale')."""

    def is_adapted(path: tuple, _: Any) -> bool:
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return name not in _NOT_ADAPTED_PARAM_NAMES

    return jax.tree_util.tree_map_with_path(is_adapted, params)


def lars(
    learning_rate: Union[float, optax.Schedule],
    *,
    weight_decay: float = 1.5e-6,
    trust_coefficient: float = 1e-3,
    momentum: float = 0.9,
) -> optax.GradientTransformation:
    """LARS of the DetCon/BYOL releases: decay -> trust ratio -> momentum -> times -lr(step).

    Biases and BatchNorm parameters are neither decayed nor trust-ratio scaled (`lars_mask`).
    Unlike `optax.lars`, the learning rate multiplies the momentum trace rather than feeding it,
    so a changing rate (warm-up, cosine) rescales the whole trace at once, and the step-0
    gradient enters the trace even though lr(0) = 0.
    """
    if callable(learning_rate):
        schedule = learning_rate
        apply_learning_rate = optax.scale_by_schedule(lambda count: -schedule(count))
    else:
        apply_learning_rate = optax.scale(-learning_rate)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=lars_mask),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), lars_mask),
        optax.trace(decay=momentum, nesterov=False),
        apply_learning_rate,
    )


WARMUP_RULES = ("released", "epochs", "fraction")


def sgd(
    learning_rate: Union[float, optax.Schedule],
    *,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
) -> optax.GradientTransformation:
    """torch.optim.SGD as MoCo uses it: g + wd * p on every parameter, then heavy-ball momentum
    (buffer starts at the first gradient, no dampening, no Nesterov), then -lr."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum, nesterov=False),
    )


def frozen_labels(params: Any, frozen_prefix: str) -> Any:
    """'frozen' for the leaves of modules named `frozen_prefix`..., else 'trainable'."""
    return {
        module: {
            name: "frozen" if frozen_prefix and module.startswith(frozen_prefix) else "trainable"
            for name in leaves
        }
        for module, leaves in params.items()
    }


def adamw(
    learning_rate: Union[float, optax.Schedule],
    *,
    weight_decay: float = 1e-4,
    clip_norm: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    frozen_prefix: str = "",
) -> optax.GradientTransformation:
    """torch.optim.AdamW after clip_grad_norm_, as DETR/DETReg train (main.py, engine.py).

    Modules whose name starts with `frozen_prefix` (the torso, 'res_net') are frozen as the
    official `--lr_backbone 0` freezes them (requires_grad False, outside the optimiser): their
    updates are zero, they hold no Adam moments, and the clipping norm is taken over the
    trainable leaves only. Weight decay applies to every trainable leaf, biases included, as
    torch's AdamW param groups there do.
    """
    trainable = optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm > 0 else optax.identity(),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )
    if not frozen_prefix:
        return trainable
    return optax.multi_transform(
        {"trainable": trainable, "frozen": optax.set_to_zero()},
        functools.partial(frozen_labels, frozen_prefix=frozen_prefix),
    )


def step_drop_learning_rate(
    step: Union[int, jax.Array], *, base_learning_rate: float, drop_steps: int
) -> jax.Array:
    """DETR's StepLR: base until drop_steps, then base / 10 (no batch scaling, no warm-up)."""
    dropped = jnp.asarray(step) >= drop_steps
    return jnp.where(dropped, 0.1 * base_learning_rate, base_learning_rate).astype(jnp.float32)


def warmup_steps(config: ml_collections.ConfigDict, total_steps: int) -> int:
    """Warm-up length in steps by config.optim.warmup_rule.

    'released': (pretrain_epochs // 100) epochs, as the released DetCon-B config; 'epochs':
    warmup_epochs epochs (BYOL, SimCLR: 10); 'fraction': warmup_fraction of the run.
    """
    rule = config.optim.warmup_rule
    if rule == "fraction":
        return int(round(config.optim.warmup_fraction * total_steps))
    if rule not in WARMUP_RULES:
        raise ValueError(
            f"--config.optim.warmup_rule={rule!r} is unknown; use one of "
            f"{', '.join(map(repr, WARMUP_RULES))}."
        )
    examples = config.data.num_train_examples
    if examples <= 0:
        raise ValueError(
            f"--config.optim.warmup_rule={rule!r} needs --config.data."
            "num_train_examples > 0 (the dataset size); set it, or use "
            "--config.optim.warmup_rule=fraction."
        )
    batch = config.training.batch_size
    if rule == "released":
        return released_warmup_steps(config.training.pretrain_epochs, examples, batch)
    return int(config.optim.warmup_epochs * examples // batch)


def learning_rate_fn(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The config's learning-rate schedule as a function of the step."""
    if config.optim.name == "adamw":
        epochs = config.optim.get("lr_drop_epochs", 200)
        examples = max(1, config.data.num_train_examples)
        return functools.partial(
            step_drop_learning_rate,
            base_learning_rate=config.optim.base_learning_rate,
            drop_steps=max(1, int(epochs * examples // config.training.batch_size)),
        )
    return functools.partial(
        learning_rate,
        base_learning_rate=config.optim.base_learning_rate,
        batch_size=config.training.batch_size,
        total_steps=total_steps,
        warmup_steps=warmup_steps(config, total_steps),
    )


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """The optimiser of config.optim with its warm-up + cosine learning-rate schedule."""
    schedule = learning_rate_fn(config, total_steps)
    if config.optim.name == "lars":
        return lars(
            schedule,
            weight_decay=config.optim.weight_decay,
            trust_coefficient=config.optim.trust_coefficient,
            momentum=config.optim.momentum,
        )
    if config.optim.name == "sgd":
        return sgd(schedule, weight_decay=config.optim.weight_decay, momentum=config.optim.momentum)
    if config.optim.name == "adamw":
        o = config.optim  # defaults: DETR's main.py; configs/detreg.py sets them all
        return adamw(
            schedule,
            weight_decay=o.weight_decay,
            clip_norm=o.get("clip_norm", 0.1),
            b1=o.get("b1", 0.9),
            b2=o.get("b2", 0.999),
            eps=o.get("eps", 1e-8),
            frozen_prefix=o.get("frozen_prefix", ""),
        )
    raise ValueError(
        f"--config.optim.name={config.optim.name!r} is not an optimiser; choose 'lars', 'sgd' "
        "or 'adamw'."
    )
