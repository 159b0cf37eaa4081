"""MoCo v2 (Chen et al., 2020): a query encoder against a momentum key encoder and a queue of
negatives; the base of DenseCL and DetCo.

Momentum order. MoCo updates the key encoder before its forward at iteration t,
k_t = m k_{t-1} + (1 - m) q_t, with k initialised as a copy of q. The shared step instead
applies the update after the optimiser with the new online parameters and stores
k_{t+1} = m k_t + (1 - m) q_{t+1} for step t + 1. With the target initialised as a copy of the
online network (target_init "copy", so k_0 = q_0 = m q_0 + (1 - m) q_0) and a constant m, both
recursions give every step's key encoder the same parameters.

BatchNorm. MoCo's query encoder normalises with per-device statistics and its key encoder with
shuffle BN (detcon.ops.shuffle_bn); both can be switched to cross-replica statistics in the config.
On one device shuffle BN has no other device to shuffle to, and the official code refuses to run
(the key BN statistics would leak); here it is emulated as MoCo's single-GPU demo does
(SplitBatchNorm, moco/colab): the key batch is shuffled, split into `shuffle_bn_groups`
groups normalised with their own statistics, and unshuffled; the moving averages take one update
per group. With G groups on one device the keys equal those of G devices under shuffle BN.
Per-device BatchNorm averages are averaged over devices after each step, so every device holds
the same state (what is checkpointed); this changes no training forward pass.
"""

from typing import Any, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
from absl import logging

from detcon.methods import base, registry
from detcon.models import heads as model_lib
from detcon.models import moco_heads
from detcon.ops import augment, losses, queues, shuffle_bn

QUERY_BATCH_NORM = ("per_device", "cross_replica")
KEY_BATCH_NORM = ("shuffle", "cross_replica")
QUEUE_KEY_SEED = 0  # queues start from a fixed draw, independent of the run seed (as MoCo's randn)


def moco_view(keys: jax.Array, images: jax.Array) -> model_lib.GlobalView:
    """MoCo v2's colour/blur augmentation of images [b, S, S, 3], keys [b, 1, 2], normalised."""
    views = augment.augment_batch(keys[:, 0], images, augment.MOCO_V2_VIEW)
    return model_lib.GlobalView(augment.normalize(views))


@registry.register
class MoCoV2(base.Method):
    """InfoNCE of the query view against its momentum key and a queue of past keys."""

    name = "moco_v2"
    needs_masks = False
    hidden_size_fields = ("projector_hidden_size",)
    output_size_fields = ("projector_output_size",)
    has_target = True
    target_init = "copy"  # MoCo's builder copies the query encoder into the key encoder
    console_metrics = ("moco_loss",)
    online_views = (0,)  # the query image
    target_views = (1,)  # the key image

    def __init__(self, config, total_steps: int):
        super().__init__(config, total_steps)
        s = self.settings
        if s.query_batch_norm not in QUERY_BATCH_NORM:
            raise ValueError(
                f"--config.{self.name}.query_batch_norm={s.query_batch_norm!r}: "
                f"choose one of {QUERY_BATCH_NORM}."
            )
        if s.key_batch_norm not in KEY_BATCH_NORM:
            raise ValueError(
                f"--config.{self.name}.key_batch_norm={s.key_batch_norm!r}: "
                f"choose one of {KEY_BATCH_NORM}."
            )
        if not 0.0 <= s.momentum <= 1.0:
            raise ValueError(f"--config.{self.name}.momentum={s.momentum} must be in [0, 1].")
        queues.check_queue_size(
            s.queue_size, config.training.batch_size, f"--config.{self.name}.queue_size"
        )
        if s.key_batch_norm == "shuffle" and jax.device_count() == 1:
            groups = s.get("shuffle_bn_groups", 8)
            if groups < 1 or config.training.batch_size % groups:
                raise ValueError(
                    f"--config.{self.name}.shuffle_bn_groups={groups} must divide the batch "
                    f"({config.training.batch_size}) to emulate shuffle BN on one device."
                )
            logging.info(
                "%s: one device, so shuffle BN is emulated by split BatchNorm: the key batch "
                "is shuffled and normalised in %d groups of %d (MoCo's single-GPU demo).",
                self.name,
                groups,
                config.training.batch_size // groups,
            )

    # ---------------------------------------------------------------------------------- networks

    def heads(self) -> moco_heads.MocoHeads:
        """MoCo v2's global MLP head (no BatchNorm)."""
        return moco_heads.MocoHeads(
            self.settings.projector_hidden_size, self.settings.projector_output_size
        )

    def _network(self, cross_replica: bool, axis_name: Optional[str]) -> hk.TransformedWithState:
        return moco_heads.make_network(
            self.config.model, self.heads(), axis_name if cross_replica else None
        )

    def make_network(self, axis_name: Optional[str]) -> hk.TransformedWithState:
        return self._network(self.settings.query_batch_norm == "cross_replica", axis_name)

    def view_inputs(self, keys: jax.Array, batch: base.Batch, view: int) -> model_lib.GlobalView:
        return moco_view(keys, batch[f"view{view + 1}"])

    def sync_online_state(self, state: hk.State, axis_name: Optional[str]) -> hk.State:
        if axis_name is None or self.settings.query_batch_norm == "cross_replica":
            return state
        return base.mean_over_devices(state, axis_name)

    def target_forward(
        self,
        network: hk.TransformedWithState,
        params: hk.Params,
        state: hk.State,
        views: Sequence[Any],
        step_key: jax.Array,
        axis_name: Optional[str],
    ) -> base.Forward:
        """The key encoder on the key view, under shuffle BN or cross-replica BN."""
        del network  # the key encoder's BatchNorm differs from the query encoder's
        (view,) = views
        if self.settings.key_batch_norm == "cross_replica":
            key_network = self._network(True, axis_name)
            out, state = key_network.apply(
                params, state, None, view, is_training=True, online=False
            )
            return base.Forward((out,), state)
        if axis_name is None or jax.lax.axis_size(axis_name) == 1:
            return self._split_batch_norm_forward(params, state, view, step_key, axis_name)
        key_network = self._network(False, axis_name)
        perm = shuffle_bn.permutation(step_key, view.images.shape[0], axis_name)
        out, state = key_network.apply(
            params,
            state,
            None,
            shuffle_bn.shuffle(view, perm, axis_name),
            is_training=True,
            online=False,
        )
        return base.Forward(
            (shuffle_bn.unshuffle(out, perm, axis_name),), base.mean_over_devices(state, axis_name)
        )

    def _split_batch_norm_forward(
        self,
        params: hk.Params,
        state: hk.State,
        view: Any,
        step_key: jax.Array,
        axis_name: Optional[str],
    ) -> base.Forward:
        """Shuffle BN on one device: the key batch [b, ...] shuffled, normalised in groups of
        b / shuffle_bn_groups with their own statistics, outputs put back in order."""
        groups = self.settings.get("shuffle_bn_groups", 8)
        batch = view.images.shape[0]
        if batch % groups:
            raise ValueError(
                f"--config.{self.name}.shuffle_bn_groups={groups} must divide the per-device "
                f"batch ({batch})."
            )
        perm = jax.random.permutation(step_key, batch)
        inverse = jnp.argsort(perm)
        shuffled = jax.tree_util.tree_map(lambda x: x[perm], view)
        out, state = self._network(False, None).apply(
            params, state, None, shuffled, is_training=True, online=False, num_views=groups
        )
        out = jax.tree_util.tree_map(lambda x: x[inverse], out)
        if axis_name is not None:
            state = base.mean_over_devices(state, axis_name)
        return base.Forward((out,), state)

    def target_decay(self, step: jax.Array) -> jax.Array:
        """MoCo's constant momentum (0.999)."""
        del step
        return jnp.asarray(self.settings.momentum, jnp.float32)

    # ------------------------------------------------------------------------------ queue, loss

    def init_extra(self) -> dict[str, jax.Array]:
        return dict(
            queue=queues.init_queue(
                jax.random.PRNGKey(QUEUE_KEY_SEED),
                self.settings.queue_size,
                self.settings.projector_output_size,
            ),
            queue_pointer=jnp.zeros((), jnp.int32),
        )

    def loss(
        self,
        online: Sequence[moco_heads.MocoOutputs],
        target: Optional[Sequence[moco_heads.MocoOutputs]],
        views: Sequence[Any],
        extra: Any,
        axis_name: Optional[str],
    ) -> tuple[jax.Array, base.Metrics]:
        q, k = online[0].projection, target[0].projection
        loss = losses.moco_loss(q, k, extra["queue"], temperature=self.settings.temperature)
        return loss, dict(moco_loss=loss, projection_std=base.feature_std(q))

    def update_extra(
        self,
        extra: Any,
        online: Sequence[moco_heads.MocoOutputs],
        target: Optional[Sequence[moco_heads.MocoOutputs]],
        step_key: jax.Array,
        axis_name: Optional[str],
    ) -> dict[str, jax.Array]:
        keys = queues.gather_keys(
            losses.l2_normalize(target[0].projection.astype(jnp.float32)), axis_name
        )
        pointer = extra["queue_pointer"]
        return dict(
            extra,
            queue=queues.enqueue(extra["queue"], pointer, keys),
            queue_pointer=queues.advance(pointer, keys.shape[0], self.settings.queue_size),
        )
