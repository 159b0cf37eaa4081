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
    patches: jax.Array  # [N, 9, P, P, 3] shuffled patches of the view's jigsaw crop (jigsaw())


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


JIGSAW_AREA_RANGE = (0.6, 1.0)  # DetCo §3.4: the jigsaw crop covers at least 60% of the image


def jigsaw_cell_size(patch_size: int) -> int:
    """Cell side for patches of `patch_size`: DetCo's 85 px cells around 64 px patches, scaled
    (round(85 P / 64), halves up): 64 -> 85 (a 255 px crop), 32 -> 43 (129 px)."""
    return (85 * patch_size + 32) // 64


def jigsaw_crop_size(patch_size: int) -> int:
    """Side of the jigsaw crop: three cells (255 px for DetCo's 64 px patches)."""
    return 3 * jigsaw_cell_size(patch_size)


def jigsaw(crops: jax.Array, keys: jax.Array, patch_size: int) -> jax.Array:
    """DetCo's local patches (§3.4): crops [N, 3c, 3c, 3] -> [N, 9, P, P, 3].

    Each crop is cut into a 3 x 3 grid of c-pixel cells, a random P x P window is taken inside
    each cell, and the nine are shuffled (keys [N, 2], one per crop), so the concatenated local
    head cannot read a patch's position from its slot.
    """
    n, side, _, channels = crops.shape
    cell = side // 3
    if side != 3 * cell or cell < patch_size:
        raise ValueError(
            f"jigsaw crops of {side} px cannot hold 3 x 3 cells of at least patch_size="
            f"{patch_size} px; expected {jigsaw_crop_size(patch_size)} px."
        )
    cells = crops.reshape(n, 3, cell, 3, cell, channels).transpose(0, 1, 3, 2, 4, 5)
    cells = cells.reshape(n, NUM_PATCHES, cell, cell, channels)

    def one(cells_of_crop: jax.Array, key: jax.Array) -> jax.Array:
        offset_key, order_key = jax.random.split(key)
        offsets = jax.random.randint(offset_key, (NUM_PATCHES, 2), 0, cell - patch_size + 1)
        windows = jax.vmap(
            lambda c, o: jax.lax.dynamic_slice(
                c, (o[0], o[1], 0), (patch_size, patch_size, channels)
            )
        )(cells_of_crop, offsets)
        return windows[jax.random.permutation(order_key, NUM_PATCHES)]

    return jax.vmap(one)(cells, keys)


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
