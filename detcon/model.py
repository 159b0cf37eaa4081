"""The DetCon forward for one view: ResNet torso -> mask pooling -> projector -> predictor."""
from typing import NamedTuple, Optional

import haiku as hk
import jax
import ml_collections

from detcon import masks as masks_lib
from detcon import networks
from detcon import precision as precision_lib


class ViewOutputs(NamedTuple):
    """Per-view network outputs."""
    projection: jax.Array            # [N, R, P] projected mask-pooled features
    prediction: Optional[jax.Array]  # [N, R, P] predictor outputs (online network only)
    logits: jax.Array                # [N, K] online linear probe on stop-gradient features
    features: jax.Array              # [N, C] globally pooled torso features


def grid_shape(image_size: int) -> tuple[int, int]:
    """The torso's output grid for a square input (stride 32), e.g. 224 -> (7, 7)."""
    if image_size % 32:
        raise ValueError(f"image_size must be a multiple of 32 (the ResNet stride), got {image_size}.")
    return image_size // 32, image_size // 32


def make_network(model: ml_collections.ConfigDict, axis_name: Optional[str]
                 ) -> hk.TransformedWithState:
    """Returns init/apply for `forward(images, masks, mask_ids, is_training, with_predictor)`.

    images [N, S, S, 3] normalised; masks [N, M, G] grid masks; mask_ids [N, R].
    """
    precision = model.precision  # read now: a later edit of the config must not change this network
    precision_lib.check_precision(precision)

    def forward(images: jax.Array, masks: jax.Array, mask_ids: jax.Array, is_training: bool,
                with_predictor: bool = True) -> ViewOutputs:
        # Policies apply while tracing (see precision.policies), so each network keeps its own.
        with precision_lib.policies(precision):
            torso = networks.ResNetTorso(model.depth, model.width_multiplier, axis_name,
                                         bn_decay_rate=model.bn_decay_rate)
            projector = networks.MLP(model.projector_hidden_size, model.projector_output_size,
                                     axis_name, model.bn_decay_rate, name="projector")
            fmap = torso(images, is_training=is_training)
            n, h, w, c = fmap.shape
            pooled = masks_lib.mask_pool(fmap.reshape(n, h * w, c), masks, mask_ids)
            projection = projector(pooled, is_training=is_training)
            prediction = None
            if with_predictor:
                predictor = networks.MLP(model.predictor_hidden_size, model.projector_output_size,
                                         axis_name, model.bn_decay_rate, name="predictor")
                prediction = predictor(projection, is_training=is_training)
            features = fmap.mean(axis=(1, 2))
            logits = networks.LinearClassifier(model.num_classes)(features)
            return ViewOutputs(projection, prediction, logits, features)

    return hk.transform_with_state(forward)
