"""The training state and its initialisation."""

from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from detcon import methods as methods_lib


class TrainState(NamedTuple):
    """Everything a run needs to continue: online/target networks, optimizer, step, rng, extra."""

    online_params: hk.Params
    online_state: hk.State
    target_params: hk.Params  # {} for methods without a target network
    target_state: hk.State
    opt_state: optax.OptState
    step: jax.Array  # int32 scalar: number of updates applied
    rng: jax.Array  # uint32 [2]: base key; per-step, per-example keys are folded from it
    extra: Any  # the method's own state (e.g. queues); {} when it has none


def init_state(
    rng: jax.Array,
    method: methods_lib.Method,
    network: hk.TransformedWithState,
    optimizer: optax.GradientTransformation,
) -> TrainState:
    """Initialises the online network (and target, when the method has one) on a dummy view.

    `network` must be built without a cross-replica axis (it runs outside pmap here).
    """

    @jax.jit  # one compilation instead of hundreds of eager ops
    def init(rng: jax.Array) -> TrainState:
        # The released DetCon-B key discipline: split(rng) -> (init, run); init -> (online, target).
        init_rng, state_rng = jax.random.split(rng)
        online_rng, target_rng = jax.random.split(init_rng)
        view = method.dummy_view()
        params, net_state = network.init(online_rng, view, is_training=True)
        target_params, target_state = {}, {}
        if method.has_target:
            target_params, target_state = params, net_state
            if method.target_init == "own_key":
                target_params, target_state = network.init(target_rng, view, is_training=True)
        return TrainState(
            online_params=params,
            online_state=net_state,
            target_params=target_params,
            target_state=target_state,
            opt_state=optimizer.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=state_rng,
            extra=method.init_extra(),
        )

    return init(rng)


def count_params(tree: Any) -> int:
    """Number of scalars in a pytree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
