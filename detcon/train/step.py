"""The shared update step: keys -> view inputs -> target forward -> grad of the method's loss ->
pmean -> optimiser -> target update -> extra state. Methods plug in through detcon.methods."""

from typing import Callable, Mapping

import haiku as hk
import jax
import optax

from detcon import devices as devices_lib
from detcon import methods as methods_lib
from detcon.ops import losses
from detcon.train.state import TrainState

AXIS = devices_lib.AXIS  # the pmap axis: cross-replica BatchNorm, loss negatives, grad averaging
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def example_keys(rng: jax.Array, step: jax.Array, index: jax.Array, num: int) -> jax.Array:
    """Per-example keys [B, num, 2] from the run key, the step and global example indices [B].

    Keying by global index (not device or position on it) makes the randomness independent of
    how the global batch is split across devices and hosts.
    """
    step_key = jax.random.fold_in(rng, step)
    return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(step_key, i), num))(index)


def make_update_step(
    method: methods_lib.Method,
    network: hk.TransformedWithState,
    optimizer: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    axis_name: str | None = AXIS,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Returns the per-device update step, to be wrapped in jax.pmap(axis_name=AXIS).

    batch: view1/view2 [b, S, S, 3] in [0, 1]; fh_mask1/fh_mask2 [b, S, S] int (methods whose
    data_needs asks for masks); label [b] (-1 if none); index [b] global example index. Other
    keys reach only the method's `batch_metrics`.
    """
    per_view = method.keys_per_view

    def update_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        keys = example_keys(state.rng, state.step, batch["index"], 2 * per_view)
        views = tuple(
            method.view_inputs(keys[:, v * per_view : (v + 1) * per_view], batch, v)
            for v in range(2)
        )
        # A step-wide key (same on every device) for methods that draw global randomness,
        # e.g. MoCo's batch shuffle.
        step_key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 2**31 - 1)

        online_views = tuple(views[v] for v in method.online_views)
        target_outputs, target_state = None, state.target_state
        if method.has_target:
            forward = method.target_forward(
                network,
                state.target_params,
                state.target_state,
                tuple(views[v] for v in method.target_views),
                step_key,
                axis_name,
            )
            target_outputs = jax.lax.stop_gradient(forward.outputs)
            target_state = forward.state

        def loss_fn(params: hk.Params):
            online = methods_lib.forward_views(
                network,
                params,
                state.online_state,
                online_views,
                method.config.model.one_pass_views,
                is_training=True,
                online=True,
            )
            objective, aux = method.loss(
                online.outputs, target_outputs, views, state.extra, axis_name
            )
            # The online linear probe (stop-gradient features) is every method's training signal
            # of label quality; it never reaches the torso.
            cls_loss, top1 = losses.classification_loss(online.outputs[0].logits, batch["label"])
            aux = dict(aux, objective=objective, classifier_loss=cls_loss, top1=top1)
            return objective + cls_loss, (online.state, online.outputs, aux)

        (loss, (online_state, online_outputs, aux)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(state.online_params)
        online_state = method.sync_online_state(online_state, axis_name)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.online_params)
        online_params = optax.apply_updates(state.online_params, updates)
        metrics = dict(
            loss=loss, learning_rate=learning_rate(state.step), **aux, **method.batch_metrics(batch)
        )

        target_params = state.target_params
        if method.has_target:
            tau = method.target_decay(state.step)
            target_params = jax.tree_util.tree_map(
                lambda t, o: tau * t + (1.0 - tau) * o, state.target_params, online_params
            )
            metrics["tau"] = tau
        extra = method.update_extra(
            state.extra, jax.lax.stop_gradient(online_outputs), target_outputs, step_key, axis_name
        )
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name)
        new_state = TrainState(
            online_params,
            online_state,
            target_params,
            target_state,
            opt_state,
            state.step + 1,
            state.rng,
            extra,
        )
        return new_state, metrics

    return update_step


def pmap_update_step(update_step: Callable, devices=None) -> Callable:
    """pmaps the step over local devices with axis AXIS, donating the state buffers."""
    return jax.pmap(update_step, axis_name=AXIS, donate_argnums=(0,), devices=devices)
