"""DenseCL (Wang et al., CVPR 2021): MoCo v2 plus a dense InfoNCE between grid cells matched by
backbone-feature similarity, with a second queue of pooled dense keys (WXinlong/DenseCL
openselfsup/models/densecl.py)."""

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from detcon.methods import base, moco, registry
from detcon.models import moco_heads
from detcon.ops import losses, queues

DENSE_QUEUE_KEY_SEED = 1


@registry.register
class DenseCL(moco.MoCoV2):
    """(1 - w) * MoCo(global) + w * dense InfoNCE; w is 0 for the first dense_warmup_steps."""

    name = "densecl"
    console_metrics = ("global_loss", "dense_loss")
    hidden_size_fields = ("projector_hidden_size", "dense_hidden_size")

    def __init__(self, config, total_steps: int):
        super().__init__(config, total_steps)
        if not 0.0 <= self.settings.dense_weight <= 1.0:
            raise ValueError(
                f"--config.densecl.dense_weight={self.settings.dense_weight} must be in [0, 1]."
            )

    def heads(self) -> moco_heads.MocoHeads:
        s = self.settings
        return moco_heads.MocoHeads(
            s.projector_hidden_size, s.projector_output_size, dense_hidden=s.dense_hidden_size
        )

    def init_extra(self) -> dict[str, jax.Array]:
        extra = super().init_extra()
        extra["dense_queue"] = queues.init_queue(
            jax.random.PRNGKey(DENSE_QUEUE_KEY_SEED),
            self.settings.queue_size,
            self.settings.projector_output_size,
        )
        # The loss has no step argument; the warm-up (DenseCLWarmupHook) counts updates here.
        extra["updates"] = jnp.zeros((), jnp.int32)
        return extra

    def dense_weight(self, updates: jax.Array) -> jax.Array:
        """lambda: 0 during the warm-up, then config.densecl.dense_weight."""
        return jnp.where(
            updates < self.settings.dense_warmup_steps, 0.0, self.settings.dense_weight
        ).astype(jnp.float32)

    def loss(
        self,
        online: Sequence[moco_heads.MocoOutputs],
        target: Optional[Sequence[moco_heads.MocoOutputs]],
        views: Sequence[Any],
        extra: Any,
        axis_name: Optional[str],
    ) -> tuple[jax.Array, base.Metrics]:
        q, k = online[0], target[0]
        weight = self.dense_weight(extra["updates"])
        temperature = self.settings.temperature
        # densecl_loss's two terms, each evaluated once (the dense one is B*S x K logits) and
        # reported alone; their mix is densecl_loss(..., dense_weight=weight).
        global_loss = losses.moco_loss(
            q.projection, k.projection, extra["queue"], temperature=temperature
        )
        dense_loss = losses.densecl_loss(
            q.projection,
            k.projection,
            extra["queue"],
            q.dense,
            k.dense,
            q.backbone,
            k.backbone,
            extra["dense_queue"],
            temperature=temperature,
            dense_weight=1.0,
        )
        loss = (1.0 - weight) * global_loss + weight * dense_loss
        metrics = dict(
            global_loss=global_loss,
            dense_loss=dense_loss,
            dense_weight=weight,
            projection_std=base.feature_std(q.projection),
            dense_std=base.feature_std(q.dense),
        )
        return loss, metrics

    def update_extra(
        self,
        extra: Any,
        online: Sequence[moco_heads.MocoOutputs],
        target: Optional[Sequence[moco_heads.MocoOutputs]],
        step_key: jax.Array,
        axis_name: Optional[str],
    ) -> dict[str, jax.Array]:
        pointer = extra["queue_pointer"]
        extra = super().update_extra(extra, online, target, step_key, axis_name)
        # The dense queue holds each key image's average-pooled dense projection (k2).
        pooled = losses.l2_normalize(target[0].dense.astype(jnp.float32).mean(axis=1))
        return dict(
            extra,
            dense_queue=queues.enqueue(
                extra["dense_queue"], pointer, queues.gather_keys(pooled, axis_name)
            ),
            updates=extra["updates"] + 1,
        )
