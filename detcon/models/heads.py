"""Networks of the methods: the shared ResNet torso with mask-pooled or global heads."""

from typing import NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from detcon.models import networks
from detcon.models import precision as precision_lib
from detcon.ops import masks as masks_lib


class MaskedView(NamedTuple):
    """Inputs of one view for the mask-pooling methods (DetCon-B, DetCon-S)."""

    images: jax.Array  # [N, S, S, 3] augmented and normalised
    masks: jax.Array  # [N, M, G] binary grid masks
    mask_ids: jax.Array  # [N, R] sampled mask ids (negative: padding)


class GlobalView(NamedTuple):
    """Inputs of one view for the global-pooling methods (BYOL, SimCLR)."""

    images: jax.Array  # [N, S, S, 3] augmented and normalised


class ViewOutputs(NamedTuple):
    """Per-view network outputs."""

    projection: jax.Array  # [N, R, P] (masked) or [N, P] (global) projections
    prediction: Optional[jax.Array]  # same shape, predictor outputs (online network only)
    logits: jax.Array  # [N, K] online linear probe on stop-gradient features
    features: jax.Array  # [N, C] globally pooled torso features


class Heads(NamedTuple):
    """Head sizes of a method: projector MLP, optional predictor MLP (hidden 0: none)."""

    projector_hidden: int
    projector_output: int
    predictor_hidden: int = 0
    projector_final_bn: bool = False  # SimCLR's projector ends in BatchNorm


def grid_shape(image_size: int) -> tuple[int, int]:
    """The torso's output grid for a square input (stride 32), e.g. 224 -> (7, 7)."""
    if image_size % 32:
        raise ValueError(
            f"image_size must be a multiple of 32 (the ResNet stride), got {image_size}."
        )
    return image_size // 32, image_size // 32


def make_network(
    model: ml_collections.ConfigDict, heads: Heads, axis_name: Optional[str], masked: bool
) -> hk.TransformedWithState:
    """init/apply of `forward(view, is_training, online=True, num_views=1) -> ViewOutputs`.

    masked: mask-pool the feature map over view.masks/mask_ids ([N, R, C]) before the heads,
    else average-pool it ([N, C]). The predictor runs on the online network only. num_views > 1:
    `view` holds that many views stacked along the batch, normalised by BatchNorm separately.
    """
    precision = model.precision  # read now: a later edit of the config must not change this network
    precision_lib.check_precision(precision)
    init = model.get("init", "haiku")  # the release's initialisers (networks.INIT_SCHEMES)
    networks.check_init_scheme(init)  # refuses an unknown scheme when the network is built
    # bf16 runs normalise in bf16 (fp32 statistics) unless the config keeps them fp32.
    norm_dtype = jnp.bfloat16 if precision == "bfloat16" and model.bf16_batch_norm else jnp.float32

    def forward(
        view: NamedTuple, is_training: bool, online: bool = True, num_views: int = 1
    ) -> ViewOutputs:
        # Policies apply while tracing (see precision.policies), so each network keeps its own.
        with (
            precision_lib.policies(precision),
            networks.batch_norm_mode(num_views, norm_dtype),
            networks.init_scheme(init),
        ):
            torso = networks.ResNetTorso(
                model.depth, model.width_multiplier, axis_name, bn_decay_rate=model.bn_decay_rate
            )
            projector = networks.MLP(
                heads.projector_hidden,
                heads.projector_output,
                axis_name,
                model.bn_decay_rate,
                final_batch_norm=heads.projector_final_bn,
                name="projector",
            )
            fmap = torso(view.images, is_training=is_training)
            n, h, w, c = fmap.shape
            features = fmap.mean(axis=(1, 2))
            if masked:
                pooled = masks_lib.mask_pool(fmap.reshape(n, h * w, c), view.masks, view.mask_ids)
            else:
                pooled = features
            projection = projector(pooled, is_training=is_training)
            prediction = None
            if online and heads.predictor_hidden:
                predictor = networks.MLP(
                    heads.predictor_hidden,
                    heads.projector_output,
                    axis_name,
                    model.bn_decay_rate,
                    name="predictor",
                )
                prediction = predictor(projection, is_training=is_training)
            logits = networks.LinearClassifier(model.num_classes)(features)
            return ViewOutputs(projection, prediction, logits, features)

    return hk.transform_with_state(forward)
