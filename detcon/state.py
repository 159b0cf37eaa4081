"""The training state and its initialisation."""
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from detcon import masks as masks_lib
from detcon import model as model_lib


class TrainState(NamedTuple):
    """Everything a run needs to continue: online/target networks, optimizer, step and rng."""
    online_params: hk.Params
    online_state: hk.State
    target_params: hk.Params
    target_state: hk.State
    opt_state: optax.OptState
    step: jax.Array   # int32 scalar: number of updates applied
    rng: jax.Array    # uint32 [2]: base key; per-step, per-example keys are folded from it


def init_state(rng: jax.Array, network: hk.TransformedWithState, optimizer: optax.GradientTransformation,
               *, image_size: int, num_samples: int, max_mask_id: int) -> TrainState:
    """Initialises online and target networks from two keys split from `rng` (as DetCon-B)."""

    @jax.jit  # one compilation instead of hundreds of eager ops
    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        online_rng, target_rng = jax.random.split(init_rng)
        images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        grid = masks_lib.binary_masks(jnp.zeros((1, image_size, image_size), jnp.int32),
                                      model_lib.grid_shape(image_size), max_mask_id)
        ids = jnp.zeros((1, num_samples), jnp.int32)
        params, net_state = network.init(online_rng, images, grid, ids, is_training=True)
        target_params, target_state = network.init(target_rng, images, grid, ids, is_training=True)
        return TrainState(online_params=params, online_state=net_state,
                          target_params=target_params, target_state=target_state,
                          opt_state=optimizer.init(params),
                          step=jnp.zeros((), jnp.int32), rng=state_rng)

    return init(rng)


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
