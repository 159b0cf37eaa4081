"""Networks of the MoCo family (MoCo v2, DenseCL, DetCo): the shared ResNet torso with BN-free
ReLU-MLP heads. Query and key encoders are the same network; the key one runs on momentum params."""

from typing import NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections

from detcon.models import networks
from detcon.models import precision as precision_lib

NUM_PATCHES = 9  # DetCo's 3 x 3 jigsaw


class JigsawView(NamedTuple):
    """Inputs of one DetCo view: the whole image and its 3 x 3 jigsaw patches."""

    images: jax.Array  # [N, S, S, 3] augmented and normalised
    patches: jax.Array  # [N, 9, P, P, 3] row-major grid cells of the same image


class MocoOutputs(NamedTuple):
    """Per-view outputs; fields a method's heads do not produce are None."""

    projection: jax.Array  # [N, D] global head (MoCo, DenseCL), [N, 4, D] per stage (DetCo)
    dense: Optional[jax.Array]  # [N, h*w, D] DenseCL dense head on the last grid
    backbone: Optional[jax.Array]  # [N, h*w, C] DenseCL last-stage torso features
    local: Optional[jax.Array]  # [N, 4, D] DetCo jigsaw (local) projections per stage
    logits: jax.Array  # [N, K] online linear probe on stop-gradient features
    features: jax.Array  # [N, C] globally pooled last-stage features


class MocoHeads(NamedTuple):
    """Head sizes: global MLP (MoCo v2), optional dense MLP (DenseCL), multi-stage (DetCo)."""

    hidden: int  # global MLP hidden width (DetCo: ignored, each stage's width)
    output: int
    dense_hidden: int = 0  # > 0: DenseCL's dense head
    multi_stage: bool = False  # DetCo: global and jigsaw heads on res2..res5


def jigsaw(images: jax.Array, patch_size: int) -> jax.Array:
    """Images [N, S, S, 3] -> [N, 9, P, P, 3]: resized to 3P x 3P, cut into a row-major 3x3 grid."""
    n, _, _, c = images.shape
    side = 3 * patch_size
    resized = jax.image.resize(images, (n, side, side, c), method="bilinear", antialias=True)
    cells = resized.reshape(n, 3, patch_size, 3, patch_size, c).transpose(0, 1, 3, 2, 4, 5)
    return cells.reshape(n, NUM_PATCHES, patch_size, patch_size, c)


def make_network(
    model: ml_collections.ConfigDict, heads: MocoHeads, axis_name: Optional[str]
) -> hk.TransformedWithState:
    """init/apply of `forward(view, is_training, online=True, num_views=1) -> MocoOutputs`.

    axis_name: cross-replica BatchNorm over it, or None for per-device statistics (MoCo's
    query encoder, and its key encoder under shuffle BN). `online` changes nothing: the key
    encoder is the query encoder's architecture on momentum parameters.
    """
    precision = model.precision
    precision_lib.check_precision(precision)
    init = model.get("init", "haiku")  # the release's initialisers (networks.INIT_SCHEMES)
    networks.check_init_scheme(init)  # refuses an unknown scheme when the network is built
    depth, width = model.depth, model.width_multiplier
    norm_dtype = jnp.bfloat16 if precision == "bfloat16" and model.bf16_batch_norm else jnp.float32

    def forward(
        view: NamedTuple, is_training: bool, online: bool = True, num_views: int = 1
    ) -> MocoOutputs:
        del online
        with (
            precision_lib.policies(precision),
            networks.batch_norm_mode(num_views, norm_dtype),
            networks.init_scheme(init),
        ):
            torso = networks.ResNetTorso(depth, width, axis_name, bn_decay_rate=model.bn_decay_rate)
            stages = torso(view.images, is_training=is_training, return_stages=True)
            fmap = stages[-1]
            n, h, w, c = fmap.shape
            features = fmap.mean(axis=(1, 2))
            dense = backbone = local = None
            if heads.multi_stage:
                pooled = [s.mean(axis=(1, 2)) for s in stages]
                channels = [p.shape[-1] for p in pooled]
                projection = jnp.stack(
                    [
                        networks.ReluMLP(ch, heads.output, name=f"global_head_{i}")(p)
                        for i, (ch, p) in enumerate(zip(channels, pooled))
                    ],
                    axis=1,
                )
                patches = view.patches.reshape((-1,) + view.patches.shape[2:])
                patch_stages = torso(patches, is_training=is_training, return_stages=True)
                # Pooling each patch then concatenating equals pooling the channel-concatenated
                # patch maps, as the DetCo port's local neck does.
                local = jnp.stack(
                    [
                        networks.ReluMLP(ch, heads.output, name=f"local_head_{i}")(
                            s.mean(axis=(1, 2)).reshape(n, NUM_PATCHES * ch)
                        )
                        for i, (ch, s) in enumerate(zip(channels, patch_stages))
                    ],
                    axis=1,
                )
            else:
                projection = networks.ReluMLP(heads.hidden, heads.output, name="projector")(
                    features
                )
            if heads.dense_hidden:
                backbone = fmap.reshape(n, h * w, c)
                dense = networks.ReluMLP(heads.dense_hidden, heads.output, name="dense_head")(
                    backbone
                )
            logits = networks.LinearClassifier(model.num_classes)(features)
            return MocoOutputs(projection, dense, backbone, local, logits, features)

    return hk.transform_with_state(forward)
