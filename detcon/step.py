"""The DetCon-B update step: augment -> online/target forward -> loss -> pmean grads -> LARS -> EMA."""
import functools
from typing import Callable, Mapping

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import optax

from detcon import augment
from detcon import devices as devices_lib
from detcon import losses
from detcon import masks as masks_lib
from detcon import model as model_lib
from detcon import optim
from detcon.state import TrainState

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


def _feature_std(x: jax.Array) -> jax.Array:
    """Mean over dims of the std over rois of L2-normalised features [B, R, D] (collapse check)."""
    x = losses.l2_normalize(x.reshape(-1, x.shape[-1]).astype(jnp.float32))
    return jnp.mean(jnp.std(x, axis=0))


def make_update_step(config: ml_collections.ConfigDict, network: hk.TransformedWithState,
                     optimizer: optax.GradientTransformation, total_steps: int,
                     axis_name: str | None = AXIS) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Returns the per-device update step, to be wrapped in jax.pmap(axis_name=AXIS).

    batch: view1/view2 [b, S, S, 3] in [0, 1]; fh_mask1/fh_mask2 [b, S, S] int; label [b] (-1 if
    none); index [b] global example index; folded_segments [b] int. Other keys are ignored.
    """
    if config.method != "detcon_b":
        raise ValueError(f"config.method={config.method!r} is not implemented; available: "
                         "'detcon_b'.")
    image_size = config.data.image_size
    grid = model_lib.grid_shape(image_size)
    num_samples = config.loss.num_samples
    max_mask_id = config.loss.max_mask_id
    lr_fn = learning_rate_fn(config, total_steps)

    def prepare_view(keys: jax.Array, images: jax.Array, fh: jax.Array, view: augment.AugmentConfig):
        aug_keys, sample_keys = keys[:, 0], keys[:, 1]
        images = augment.normalize(augment.augment_batch(aug_keys, images, view))
        grid_masks = masks_lib.binary_masks(fh, grid, max_mask_id)
        ids = masks_lib.sample_mask_ids(sample_keys, grid_masks, num_samples)
        return images, grid_masks, ids

    def update_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        keys = example_keys(state.rng, state.step, batch["index"], 4)
        v1 = prepare_view(keys[:, :2], batch["view1"], batch["fh_mask1"], augment.VIEW1)
        v2 = prepare_view(keys[:, 2:], batch["view2"], batch["fh_mask2"], augment.VIEW2)
        ids1, ids2 = v1[2], v2[2]

        # Target network: same sampled ids, no gradient, BatchNorm in training mode (as BYOL).
        t1, target_state = network.apply(state.target_params, state.target_state, None, *v1,
                                         is_training=True, with_predictor=False)
        t2, target_state = network.apply(state.target_params, target_state, None, *v2,
                                         is_training=True, with_predictor=False)
        target1 = jax.lax.stop_gradient(t1.projection)
        target2 = jax.lax.stop_gradient(t2.projection)

        def loss_fn(params: hk.Params):
            o1, net_state = network.apply(params, state.online_state, None, *v1, is_training=True)
            o2, net_state = network.apply(params, net_state, None, *v2, is_training=True)
            detcon = losses.detcon_b_loss(
                o1.prediction, o2.prediction, target1, target2, ids1, ids2, ids1, ids2,
                temperature=config.loss.temperature, axis_name=axis_name)
            cls_loss, top1 = losses.classification_loss(o1.logits, batch["label"])
            aux = dict(detcon_loss=detcon, classifier_loss=cls_loss, top1=top1,
                       projection_std=_feature_std(o1.projection),
                       prediction_std=_feature_std(o1.prediction))
            return detcon + cls_loss, (net_state, aux)

        (loss, (online_state, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.online_params)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.online_params)
        online_params = optax.apply_updates(state.online_params, updates)
        tau = optim.target_ema(state.step, base_ema=config.optim.base_ema, total_steps=total_steps)
        target_params = jax.tree_util.tree_map(lambda t, o: tau * t + (1.0 - tau) * o,
                                               state.target_params, online_params)
        # Segments per example merged into the last id on the host (views.reindex_segments).
        folded = jnp.mean(batch["folded_segments"].astype(jnp.float32))
        metrics = dict(loss=loss, learning_rate=lr_fn(state.step), tau=tau,
                       folded_segments=folded, **aux)
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name)
        new_state = TrainState(online_params, online_state, target_params, target_state,
                               opt_state, state.step + 1, state.rng)
        return new_state, metrics

    return update_step


WARMUP_RULES = ("released", "fraction")


def warmup_steps(config: ml_collections.ConfigDict, total_steps: int) -> int:
    """Warm-up length in steps by config.optim.warmup_rule: 'released' or 'fraction' of the run."""
    rule = config.optim.warmup_rule
    if rule == "fraction":
        return int(round(config.optim.warmup_fraction * total_steps))
    if rule != "released":
        raise ValueError(f"--config.optim.warmup_rule={rule!r} is unknown; use one of "
                         f"{', '.join(map(repr, WARMUP_RULES))}.")
    if config.data.num_train_examples <= 0:
        raise ValueError("--config.optim.warmup_rule='released' needs --config.data."
                         "num_train_examples > 0 (the dataset size); set it, or use "
                         "--config.optim.warmup_rule=fraction.")
    return optim.released_warmup_steps(config.training.pretrain_epochs,
                                       config.data.num_train_examples, config.training.batch_size)


def learning_rate_fn(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The config's learning-rate schedule as a function of the step."""
    return functools.partial(
        optim.learning_rate, base_learning_rate=config.optim.base_learning_rate,
        batch_size=config.training.batch_size, total_steps=total_steps,
        warmup_steps=warmup_steps(config, total_steps))


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """LARS with the warm-up + cosine learning-rate schedule of the config."""
    return optim.lars(learning_rate_fn(config, total_steps), weight_decay=config.optim.weight_decay,
                      trust_coefficient=config.optim.trust_coefficient,
                      momentum=config.optim.momentum)


def pmap_update_step(update_step: Callable, devices=None) -> Callable:
    """pmaps the step over local devices with axis AXIS, donating the state buffers."""
    return jax.pmap(update_step, axis_name=AXIS, donate_argnums=(0,), devices=devices)
