"""DETReg (Bar et al., CVPR 2022), DETR variant: pretrain a detector on a frozen torso to find
unsupervised region priors (class 1 vs no object, L1 + GIoU boxes) and to embed each region as
the frozen torso does (res3, average-pooled, of the region's augmented crop).

Batches (DataNeeds.num_regions = k): view1 [b, S, S, 3] (the image at the top-left of an S x S
canvas), pad_mask [b, S, S] (True on image pixels), region_boxes [b, k, 4] cxcywh normalised by
the unpadded image, region_valid [b, k]. view2 and FH masks are ignored. Official code:
amirbar/DETReg (models/detr.py, datasets/selfdet.py, configs/DETReg_top30_in_detr.sh).
"""

from typing import Any, NamedTuple, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from detcon.methods import base, registry
from detcon.models import detr, networks
from detcon.ops import augment, boxes, losses

# The region crops' augmentation (selfdet.py get_random_patch...: ColorJitter(.4, .4, .4, .1)
# p .8, RandomGrayscale .2, GaussianBlur sigma [.1, 2] p .5, no flip, no solarisation).
CROP_VIEW = augment.MOCO_V2_VIEW
# The official crop side, for images of up to 600 px (selfdet.py max_size 600).
OFFICIAL_CROP_SIDE, OFFICIAL_MAX_SIZE = 128, 600


class DETRegView(NamedTuple):
    """The detector's inputs and the region targets of one batch."""

    detector: detr.DetectorInputs
    region_boxes: jax.Array  # [b, k, 4] cxcywh normalised by the unpadded image
    region_valid: jax.Array  # [b, k] bool


def crop_side(config: ml_collections.ConfigDict) -> int:
    """Side of the region crops: config.detreg.crop_size if > 0, else 128 px scaled with the
    canvas (128 at S >= 600, the official maximum image side; S * 128 / 600 rounded to a
    multiple of 16 below that, at least 32 so res3 keeps a 4 x 4 map)."""
    if config.detreg.crop_size > 0:
        return int(config.detreg.crop_size)
    size = config.data.image_size
    if size >= OFFICIAL_MAX_SIZE:
        return OFFICIAL_CROP_SIDE
    return int(max(32, 16 * round(size * OFFICIAL_CROP_SIDE / OFFICIAL_MAX_SIZE / 16)))


def region_crops(
    keys: jax.Array, images: jax.Array, pad_mask: jax.Array, region_boxes: jax.Array, side: int
) -> jax.Array:
    """Augmented, normalised crops of the regions: keys [b, 2], images [b, S, S, 3] in [0, 1],
    pad_mask [b, S, S], region_boxes [b, k, 4] -> [b, k, side, side, 3]."""
    # The unpadded image's extent in pixels: the boxes are normalised by it.
    width = jnp.sum(pad_mask[:, 0, :], axis=-1).astype(jnp.float32)
    height = jnp.sum(pad_mask[:, :, 0], axis=-1).astype(jnp.float32)
    scale = jnp.stack([width, height, width, height], axis=-1)[:, None, :]
    xyxy = boxes.cxcywh_to_xyxy(region_boxes) * scale
    crops = jax.vmap(lambda im, bx: boxes.crop_and_resize(im, bx, side))(images, xyxy)
    b, k = region_boxes.shape[:2]
    crop_keys = jax.vmap(lambda key: jax.random.split(key, k))(keys).reshape(b * k, -1)
    flat = augment.augment_batch(crop_keys, crops.reshape((b * k, side, side, 3)), CROP_VIEW)
    return augment.normalize(flat).reshape((b, k, side, side, 3))


@registry.register
class DETReg(base.Method):
    """DETR on a frozen torso, trained to localise and embed region priors."""

    name = "detreg"
    needs_masks = False
    has_target = False
    keys_per_view = 2  # crop augmentation, dropout
    online_views = (0,)  # one image per example
    target_views = ()
    hidden_size_fields = ("hidden_dim", "dim_feedforward")
    console_metrics = ("loss_ce", "loss_bbox", "loss_giou", "loss_object_embedding")

    @classmethod
    def data_needs(cls, config: ml_collections.ConfigDict) -> base.DataNeeds:
        return base.DataNeeds(masks=False, num_regions=config.detreg.num_regions)

    def transformer_config(self) -> detr.TransformerConfig:
        s = self.settings
        return detr.TransformerConfig(
            hidden_dim=s.hidden_dim,
            num_heads=s.num_heads,
            num_encoder_layers=s.num_encoder_layers,
            num_decoder_layers=s.num_decoder_layers,
            dim_feedforward=s.dim_feedforward,
            dropout=s.dropout,
            pre_norm=s.pre_norm,
        )

    def detector_config(self) -> detr.DetectorConfig:
        m = self.config.model
        return detr.DetectorConfig(
            depth=m.depth,
            width_multiplier=m.width_multiplier,
            num_queries=self.settings.num_queries,
            num_classes=self.settings.num_classes,
            embed_dim=networks.stage_channels(m.depth, m.width_multiplier)[1],
            probe_classes=m.num_classes,
        )

    def make_network(self, axis_name: Optional[str]) -> hk.TransformedWithState:
        # The torso is frozen (inference BatchNorm), so no cross-replica statistics: axis unused.
        del axis_name
        net = detr.make_detector(self.detector_config(), self.transformer_config())
        # The step hands the network whole views; the detector reads their inputs part.
        return hk.TransformedWithState(
            lambda rng, view, *a, **k: net.init(rng, view.detector, *a, **k),
            lambda params, state, rng, view, *a, **k: net.apply(
                params, state, rng, view.detector, *a, **k
            ),
        )

    def view_inputs(self, keys: jax.Array, batch: base.Batch, view: int) -> DETRegView:
        # Both "views" are the one image (only view 0 is encoded; view 1 is dead code to XLA).
        del view
        images, pad_mask = batch["view1"], batch["pad_mask"].astype(bool)
        region_boxes = batch["region_boxes"].astype(jnp.float32)
        crops = region_crops(keys[:, 0], images, pad_mask, region_boxes, crop_side(self.config))
        # Normalised, then zero outside the image, as the official pads normalised tensors.
        normalised = jnp.where(pad_mask[..., None], augment.normalize(images), 0.0)
        inputs = detr.DetectorInputs(normalised, pad_mask, crops, keys[:, 1])
        return DETRegView(inputs, region_boxes, batch["region_valid"].astype(bool))

    def dummy_view(self) -> DETRegView:
        size, k = self.config.data.image_size, self.settings.num_regions
        batch = {
            "view1": jnp.zeros((1, size, size, 3)),
            "pad_mask": jnp.ones((1, size, size), bool),
            "region_boxes": jnp.full((1, k, 4), 0.5),
            "region_valid": jnp.ones((1, k), bool),
        }
        return self.view_inputs(jnp.zeros((1, self.keys_per_view, 2), jnp.uint32), batch, 0)

    def loss(
        self,
        online: Sequence[detr.DetectorOutputs],
        target: Optional[Sequence[Any]],
        views: Sequence[DETRegView],
        extra: Any,
        axis_name: Optional[str],
    ) -> tuple[jax.Array, base.Metrics]:
        out, view, s = online[0], views[0], self.settings
        loss, metrics = losses.detreg_loss(
            out.pred_logits,
            out.pred_boxes,
            out.pred_embed,
            view.region_boxes,
            view.region_valid,
            out.target_embed,
            axis_name=axis_name,
            cost_class=s.set_cost_class,
            cost_bbox=s.set_cost_bbox,
            cost_giou=s.set_cost_giou,
            ce_weight=s.cls_loss_coef,
            bbox_weight=s.bbox_loss_coef,
            giou_weight=s.giou_loss_coef,
            embed_weight=s.object_embedding_coef,
            eos_coef=s.eos_coef,
        )
        metrics["regions_per_image"] = jnp.mean(jnp.sum(view.region_valid, axis=-1))
        return loss, metrics

    def flops_per_image(self, torso_forward_flops: float) -> float:
        """The frozen torso's forward on the image (a lower bound: the transformer, the heads and
        the region crops' torso passes are left out)."""
        return torso_forward_flops
