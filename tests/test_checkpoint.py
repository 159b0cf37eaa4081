"""Checkpoint restore: exact round trip, and a clear refusal of an older optimiser's state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from detcon.train import optim
from detcon.train.state import TrainState
from detcon.workdir import checkpoint

_PARAMS = {"conv2_d": {"w": jnp.arange(12.0).reshape(3, 4)}, "linear": {"b": jnp.ones(4)}}


def _state(optimizer: optax.GradientTransformation, step: int = 3) -> TrainState:
    """A small state whose optimiser has taken one update, so its trace is non-zero."""
    grads = jax.tree_util.tree_map(lambda p: 0.5 * jnp.ones_like(p), _PARAMS)
    _, opt_state = optimizer.update(grads, optimizer.init(_PARAMS), _PARAMS)
    return TrainState(
        _PARAMS, {}, _PARAMS, {}, opt_state, jnp.int32(step), jax.random.PRNGKey(1), {}
    )


def _schedule(count):
    return 0.1 * (count + 1)


def test_restore_round_trips_the_current_optimiser_state(tmp_path):
    saved = _state(optim.lars(_schedule))
    manager = checkpoint.make_manager(str(tmp_path), keep=2)
    checkpoint.save(manager, saved, {"config": {"a": 1}})
    manager.close()
    manager = checkpoint.make_manager(str(tmp_path), keep=2)  # a fresh one, as after a restart
    template = _state(optim.lars(_schedule), step=0)
    restored, meta = checkpoint.restore(manager, jax.tree_util.tree_map(jnp.zeros_like, template))
    assert meta == {"config": {"a": 1}}
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(saved)
    for got, want in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(saved)):
        np.testing.assert_array_equal(got, want)


def test_state_of_optax_lars_is_refused_with_a_one_line_message(tmp_path):
    old = optax.lars(
        _schedule,
        weight_decay=1.5e-6,
        weight_decay_mask=optim.lars_mask,
        trust_coefficient=1e-3,
        trust_ratio_mask=optim.lars_mask,
        momentum=0.9,
    )
    manager = checkpoint.make_manager(str(tmp_path), keep=2)
    checkpoint.save(manager, _state(old), {})
    manager.close()
    manager = checkpoint.make_manager(str(tmp_path), keep=2)
    with pytest.raises(ValueError, match="older optimiser") as error:
        checkpoint.restore(manager, _state(optim.lars(_schedule), step=0))
    message = str(error.value)
    assert "\n" not in message and str(tmp_path) in message and "--workdir" in message
