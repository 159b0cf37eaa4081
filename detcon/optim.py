"""LARS as an optax chain, plus the learning-rate and target-EMA schedules of BYOL/DetCon."""
from typing import Any, Union

import jax
import jax.numpy as jnp
import optax

# Haiku parameter names of biases (Linear/Conv 'b') and BatchNorm affine terms: LARS neither
# decays nor trust-ratio-scales them, as in BYOL and DetCon.
_NOT_ADAPTED_PARAM_NAMES = frozenset({"b", "offset", "scale"})


def learning_rate(step: Union[int, jax.Array], *, base_learning_rate: float, batch_size: int,
                  total_steps: int, warmup_steps: int) -> jax.Array:
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


def target_ema(step: Union[int, jax.Array], *, base_ema: float, total_steps: int) -> jax.Array:
    """Scalar float32 EMA decay rising from base_ema at step 0 to 1 at total_steps (cosine)."""
    progress = jnp.minimum(jnp.asarray(step, jnp.float32), float(total_steps)) / total_steps
    return 1.0 - (1.0 - base_ema) * (1.0 + jnp.cos(jnp.pi * progress)) / 2.0


def lars_mask(params: Any) -> Any:
    """LARS mask, bool pytree like params (True: decayed and trust-ratio scaled): False for 'b', 'offset', 'scale' leaves, else True."""
    def is_adapted(path: tuple, _: Any) -> bool:
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return name not in _NOT_ADAPTED_PARAM_NAMES

    return jax.tree_util.tree_map_with_path(is_adapted, params)


def lars(learning_rate: Union[float, optax.Schedule], *, weight_decay: float = 1.5e-6,
         trust_coefficient: float = 1e-3, momentum: float = 0.9
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
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient),
                     lars_mask),
        optax.trace(decay=momentum, nesterov=False),
        apply_learning_rate,
    )
