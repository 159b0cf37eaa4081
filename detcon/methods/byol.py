"""BYOL (Grill et al., NeurIPS 2020): predict the EMA target's projection of the other view."""

from typing import Any, Optional, Sequence

import haiku as hk
import jax

from detcon.methods import base, registry
from detcon.models import heads as model_lib
from detcon.ops import augment, losses

VIEWS = (augment.VIEW1, augment.VIEW2)  # BYOL's asymmetric augmentation presets


def global_view(
    keys: jax.Array, images: jax.Array, view: augment.AugmentConfig
) -> model_lib.GlobalView:
    """Augments and normalises images [b, S, S, 3] with per-example keys [b, 1, 2]."""
    return model_lib.GlobalView(augment.normalize(augment.augment_batch(keys[:, 0], images, view)))


@registry.register
class BYOL(base.Method):
    """Global-pooled online predictions regressed onto EMA-target projections."""

    name = "byol"
    needs_masks = False
    hidden_size_fields = ("projector_hidden_size", "predictor_hidden_size")
    output_size_fields = ("projector_output_size",)
    has_target = True
    # BYOL's byol_experiment._make_initial_state draws the target from its own key
    # (rng_online, rng_target = jax.random.split(rng)), not as a copy of the online network.
    target_init = "own_key"
    console_metrics = ("byol_loss",)

    def make_network(self, axis_name: Optional[str]) -> hk.TransformedWithState:
        s = self.settings
        heads = model_lib.Heads(
            s.projector_hidden_size, s.projector_output_size, s.predictor_hidden_size
        )
        return model_lib.make_network(self.config.model, heads, axis_name, masked=False)

    def view_inputs(self, keys: jax.Array, batch: base.Batch, view: int) -> model_lib.GlobalView:
        return global_view(keys, batch[f"view{view + 1}"], VIEWS[view])

    def loss(
        self,
        online: Sequence[model_lib.ViewOutputs],
        target: Optional[Sequence[model_lib.ViewOutputs]],
        views: Sequence[Any],
        extra: Any,
        axis_name: Optional[str],
    ) -> tuple[jax.Array, base.Metrics]:
        loss = losses.byol_loss(
            online[0].prediction, online[1].prediction, target[0].projection, target[1].projection
        )
        metrics = dict(
            byol_loss=loss,
            projection_std=base.feature_std(online[0].projection),
            prediction_std=base.feature_std(online[0].prediction),
        )
        return loss, metrics
