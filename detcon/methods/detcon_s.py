"""DetCon-S (Hénaff et al., ICCV 2021): SimCLR's network and loss over FH-mask-pooled features."""

from typing import Any, Optional, Sequence

import haiku as hk
import jax

from detcon.methods import base, detcon_b, registry, simclr
from detcon.models import heads as model_lib
from detcon.ops import losses


@registry.register
class DetConS(base.Method):
    """Per-object NT-Xent between the online projections of both views; no target network."""

    name = "detcon_s"
    needs_masks = True
    hidden_size_fields = ("projector_hidden_size",)
    output_size_fields = ("projector_output_size",)
    has_target = False
    console_metrics = ("detcon_s_loss",)
    keys_per_view = 2

    def make_network(self, axis_name: Optional[str]) -> hk.TransformedWithState:
        return model_lib.make_network(
            self.config.model, simclr.simclr_heads(self.settings), axis_name, masked=True
        )

    def batch_metrics(self, batch: base.Batch) -> base.Metrics:
        return detcon_b.folded_segments(batch)

    def view_inputs(self, keys: jax.Array, batch: base.Batch, view: int) -> model_lib.MaskedView:
        return detcon_b.masked_view(
            self.settings,
            self.config.data.image_size,
            keys,
            batch[f"view{view + 1}"],
            batch[f"fh_mask{view + 1}"],
            simclr.view_configs(self.settings)[view],
        )

    def loss(
        self,
        online: Sequence[model_lib.ViewOutputs],
        target: Optional[Sequence[model_lib.ViewOutputs]],
        views: Sequence[model_lib.MaskedView],
        extra: Any,
        axis_name: Optional[str],
    ) -> tuple[jax.Array, base.Metrics]:
        loss = losses.detcon_s_loss(
            online[0].projection,
            online[1].projection,
            views[0].mask_ids,
            views[1].mask_ids,
            temperature=self.settings.temperature,
            axis_name=axis_name,
        )
        return loss, dict(detcon_s_loss=loss, projection_std=base.feature_std(online[0].projection))
