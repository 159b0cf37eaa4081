"""DetCon-B (Hénaff et al., ICCV 2021): BYOL with per-object (FH mask) contrastive targets."""

from typing import Any, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from detcon.methods import base, registry
from detcon.models import heads as model_lib
from detcon.ops import augment, losses
from detcon.ops import masks as masks_lib

VIEWS = (augment.VIEW1, augment.VIEW2)  # BYOL's asymmetric augmentation presets


def masked_view(
    settings: Any,
    image_size: int,
    keys: jax.Array,
    images: jax.Array,
    fh: jax.Array,
    view: augment.AugmentConfig,
) -> model_lib.MaskedView:
    """Augments images [b, S, S, 3] and samples `num_samples` of the grid masks of fh [b, S, S]."""
    aug_keys, sample_keys = keys[:, 0], keys[:, 1]
    images = augment.normalize(augment.augment_batch(aug_keys, images, view))
    grid_masks = masks_lib.binary_masks(fh, model_lib.grid_shape(image_size), settings.max_mask_id)
    ids = masks_lib.sample_mask_ids(sample_keys, grid_masks, settings.num_samples)
    return model_lib.MaskedView(images, grid_masks, ids)


def folded_segments(batch: base.Batch) -> base.Metrics:
    """Mean FH segments per example merged into the last id on the host (views.reindex_segments)."""
    if "folded_segments" not in batch:  # mock batches carry no count
        return {}
    return {"folded_segments": jnp.mean(batch["folded_segments"].astype(jnp.float32))}


@registry.register
class DetConB(base.Method):
    """Online projections' predictions vs EMA-target projections of the same FH object."""

    name = "detcon_b"
    needs_masks = True
    hidden_size_fields = ("projector_hidden_size", "predictor_hidden_size")
    output_size_fields = ("projector_output_size",)
    has_target = True
    # The official _make_initial_state draws online and target from split keys.
    target_init = "own_key"
    console_metrics = ("detcon_loss",)
    keys_per_view = 2

    def make_network(self, axis_name: Optional[str]) -> hk.TransformedWithState:
        s = self.settings
        heads = model_lib.Heads(
            s.projector_hidden_size, s.projector_output_size, s.predictor_hidden_size
        )
        return model_lib.make_network(self.config.model, heads, axis_name, masked=True)

    def batch_metrics(self, batch: base.Batch) -> base.Metrics:
        return folded_segments(batch)

    def view_inputs(self, keys: jax.Array, batch: base.Batch, view: int) -> model_lib.MaskedView:
        return masked_view(
            self.settings,
            self.config.data.image_size,
            keys,
            batch[f"view{view + 1}"],
            batch[f"fh_mask{view + 1}"],
            VIEWS[view],
        )

    def loss(
        self,
        online: Sequence[model_lib.ViewOutputs],
        target: Optional[Sequence[model_lib.ViewOutputs]],
        views: Sequence[model_lib.MaskedView],
        extra: Any,
        axis_name: Optional[str],
    ) -> tuple[jax.Array, base.Metrics]:
        ids1, ids2 = views[0].mask_ids, views[1].mask_ids
        loss = losses.detcon_b_loss(
            online[0].prediction,
            online[1].prediction,
            target[0].projection,
            target[1].projection,
            ids1,
            ids2,
            ids1,
            ids2,
            temperature=self.settings.temperature,
            axis_name=axis_name,
        )
        metrics = dict(
            detcon_loss=loss,
            projection_std=base.feature_std(online[0].projection),
            prediction_std=base.feature_std(online[0].prediction),
        )
        return loss, metrics
