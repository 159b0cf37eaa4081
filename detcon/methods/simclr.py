"""SimCLR (Chen et al., ICML 2020): NT-Xent between the projections of two views."""

from typing import Any, Optional, Sequence

import haiku as hk
import jax

from detcon.methods import base, byol, registry
from detcon.models import heads as model_lib
from detcon.ops import augment, losses


def simclr_heads(settings: Any) -> model_lib.Heads:
    """SimCLR's projector (Linear -> BN -> ReLU -> Linear -> BN), no predictor."""
    return model_lib.Heads(
        settings.projector_hidden_size,
        settings.projector_output_size,
        predictor_hidden=0,
        projector_final_bn=True,
    )


def view_configs(settings: Any) -> tuple[augment.AugmentConfig, augment.AugmentConfig]:
    """The two views' augmentations: SimCLR's symmetric preset or BYOL's asymmetric pair."""
    if settings.augmentations == "simclr":
        return (augment.SIMCLR_VIEW, augment.SIMCLR_VIEW)
    if settings.augmentations == "byol":
        return (augment.VIEW1, augment.VIEW2)
    raise ValueError(f"augmentations={settings.augmentations!r}: choose 'simclr' or 'byol'.")


@registry.register
class SimCLR(base.Method):
    """Negatives from both views of every image on every device; no target network."""

    name = "simclr"
    needs_masks = False
    hidden_size_fields = ("projector_hidden_size",)
    output_size_fields = ("projector_output_size",)
    has_target = False
    console_metrics = ("simclr_loss",)

    def make_network(self, axis_name: Optional[str]) -> hk.TransformedWithState:
        return model_lib.make_network(
            self.config.model, simclr_heads(self.settings), axis_name, masked=False
        )

    def view_inputs(self, keys: jax.Array, batch: base.Batch, view: int) -> model_lib.GlobalView:
        return byol.global_view(keys, batch[f"view{view + 1}"], view_configs(self.settings)[view])

    def loss(
        self,
        online: Sequence[model_lib.ViewOutputs],
        target: Optional[Sequence[model_lib.ViewOutputs]],
        views: Sequence[Any],
        extra: Any,
        axis_name: Optional[str],
    ) -> tuple[jax.Array, base.Metrics]:
        loss = losses.simclr_loss(
            online[0].projection,
            online[1].projection,
            temperature=self.settings.temperature,
            axis_name=axis_name,
        )
        return loss, dict(simclr_loss=loss, projection_std=base.feature_std(online[0].projection))
