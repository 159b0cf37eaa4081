"""The one place that assembles a run: method + networks + optimiser + initial state + step."""

from typing import Callable, NamedTuple

import haiku as hk
import jax
import ml_collections
import optax

from detcon import methods as methods_lib
from detcon.train import optim
from detcon.train import state as state_lib
from detcon.train import step as step_lib


class Experiment(NamedTuple):
    """A built run: its method, pmap-ready network, optimiser, schedule and per-device step."""

    config: ml_collections.ConfigDict
    method: methods_lib.Method
    network: hk.TransformedWithState  # with the cross-replica axis, for use under pmap
    optimizer: optax.GradientTransformation
    learning_rate: optax.Schedule
    update_step: Callable  # per-device; wrap with step.pmap_update_step
    total_steps: int

    def init_state(self, rng: jax.Array) -> state_lib.TrainState:
        """A fresh TrainState (outside pmap, so built without the cross-replica axis)."""
        return state_lib.init_state(
            rng, self.method, self.method.make_network(None), self.optimizer
        )


def build(
    config: ml_collections.ConfigDict, total_steps: int, axis_name: str | None = step_lib.AXIS
) -> Experiment:
    """Builds the experiment of `config` for a run of `total_steps` updates."""
    method = methods_lib.get(config.method)(config, total_steps)
    network = method.make_network(axis_name)
    optimizer = optim.make_optimizer(config, total_steps)
    learning_rate = optim.learning_rate_fn(config, total_steps)
    update_step = step_lib.make_update_step(method, network, optimizer, learning_rate, axis_name)
    return Experiment(config, method, network, optimizer, learning_rate, update_step, total_steps)
