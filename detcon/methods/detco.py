"""DetCo (Xie et al., ICCV 2021): MoCo v2 on every ResNet stage, with global and 3 x 3 jigsaw
(local) representations; per stage global<->global, local->global and local<->local InfoNCE,
each against its own queue.

Written from the paper, cross-checked with the unofficial MoCo-based port (Qianna00/openselfsup
openselfsup/models/detco.py), whose two defects are not reproduced: its key encoder is not
initialised from the query encoder (here target_init "copy"), and its local keys are not
un-shuffled after shuffle BN (here every key output is un-shuffled).
"""

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from detcon.methods import base, moco, registry
from detcon.models import moco_heads
from detcon.ops import losses, queues

NUM_STAGES = 4
LOCAL_QUEUE_KEY_SEED = 2


@registry.register
class DetCo(moco.MoCoV2):
    """Multi-stage, multi-level MoCo: stage-weighted sum of three contrastive terms per stage."""

    name = "detco"
    console_metrics = ("detco_loss",)
    keys_per_view = 3  # the view's augmentation, the jigsaw crop's, the cells' windows and order
    hidden_size_fields = ()  # the heads' hidden layers are as wide as each stage

    def __init__(self, config, total_steps: int):
        super().__init__(config, total_steps)
        s = self.settings
        if len(s.stage_weights) != NUM_STAGES:
            raise ValueError(
                f"--config.detco.stage_weights={tuple(s.stage_weights)} needs one "
                f"weight per stage res2..res5 ({NUM_STAGES})."
            )
        if s.patch_size < 32 or s.patch_size % 32:
            raise ValueError(
                f"--config.detco.patch_size={s.patch_size} must be a positive "
                "multiple of 32 (the ResNet stride), e.g. 64."
            )

    def heads(self) -> moco_heads.MocoHeads:
        return moco_heads.MocoHeads(0, self.settings.projector_output_size, multi_stage=True)

    @classmethod
    def data_needs(cls, config) -> base.DataNeeds:
        """No masks; the pipeline adds each view's jigsaw crop (jigsaw1, jigsaw2)."""
        size = moco_heads.jigsaw_crop_size(config.detco.patch_size)
        return base.DataNeeds(masks=False, jigsaw_size=size)

    def view_inputs(self, keys: jax.Array, batch: base.Batch, view: int) -> moco_heads.JigsawView:
        """The augmented view, and nine patches of its own augmented jigsaw crop (§3.4)."""
        images = moco.moco_view(keys[:, 0:1], batch[f"view{view + 1}"]).images
        side = moco_heads.jigsaw_crop_size(self.settings.patch_size)
        crop = batch.get(f"jigsaw{view + 1}")
        if crop is None:  # mock batches carry no jigsaw crop: the unaugmented view stands in
            source = batch[f"view{view + 1}"]
            crop = jax.image.resize(source, (source.shape[0], side, side, 3), method="bilinear")
        # Augmented whole before it is cut, as the port's patch pipeline (one draw per crop).
        crop = moco.moco_view(keys[:, 1:2], crop).images
        patches = moco_heads.jigsaw(crop, keys[:, 2], self.settings.patch_size)
        return moco_heads.JigsawView(images, patches)

    def init_extra(self) -> dict[str, jax.Array]:
        size, dim = self.settings.queue_size, self.settings.projector_output_size

        def stacked(seed: int) -> jax.Array:
            keys = jax.random.split(jax.random.PRNGKey(seed), NUM_STAGES)
            return jnp.stack([queues.init_queue(k, size, dim) for k in keys])

        return dict(
            global_queues=stacked(moco.QUEUE_KEY_SEED),
            local_queues=stacked(LOCAL_QUEUE_KEY_SEED),
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
        q, k = online[0], target[0]
        stage_first = lambda x: jnp.swapaxes(x, 0, 1)  # [B, 4, D] -> [4, B, D]
        loss = losses.detco_loss(
            stage_first(q.projection),
            stage_first(q.local),
            stage_first(k.projection),
            stage_first(k.local),
            extra["global_queues"],
            extra["local_queues"],
            jnp.asarray(self.settings.stage_weights, jnp.float32),
            temperature=self.settings.temperature,
        )
        return loss, dict(
            detco_loss=loss,
            projection_std=base.feature_std(q.projection[:, -1]),
            local_std=base.feature_std(q.local[:, -1]),
        )

    def update_extra(
        self,
        extra: Any,
        online: Sequence[moco_heads.MocoOutputs],
        target: Optional[Sequence[moco_heads.MocoOutputs]],
        step_key: jax.Array,
        axis_name: Optional[str],
    ) -> dict[str, jax.Array]:
        pointer = extra["queue_pointer"]
        global_keys = [
            queues.gather_keys(losses.l2_normalize(x.astype(jnp.float32)), axis_name)
            for x in (target[0].projection, target[0].local)
        ]  # [B, 4, D] each
        # One write per stage at the shared pointer.
        push = jax.vmap(queues.enqueue, in_axes=(0, None, 1))
        return dict(
            global_queues=push(extra["global_queues"], pointer, global_keys[0]),
            local_queues=push(extra["local_queues"], pointer, global_keys[1]),
            queue_pointer=queues.advance(
                pointer, global_keys[0].shape[0], self.settings.queue_size
            ),
        )

    def flops_per_image(self, torso_forward_flops: float) -> float:
        """MoCo's 3 + 1 forward-equivalents on the image and on its nine patches, whose torso
        cost scales with their pixel count (9 P^2 / S^2 of the image's)."""
        size = self.config.data.image_size
        patches = moco_heads.NUM_PATCHES * self.settings.patch_size**2 / size**2
        return super().flops_per_image(torso_forward_flops) * (1.0 + patches)
