"""DETR (Carion et al., ECCV 2020) as DETReg's DETR variant builds it, in Haiku.

A frozen ResNet torso (BatchNorm in inference mode, no gradient) -> 1x1 projection of C5 to d ->
sine position encoding with a padding mask -> transformer (pre-norm optional, as `--pre_norm`)
-> class, box and object-embedding heads. Layouts and initialisers follow facebookresearch/detr
models/{detr,transformer,position_encoding}.py so that `detcon.weights.export` can write its
state dict. Dropout draws its masks from per-example keys, so results do not depend on how the
batch is split over devices. The transformer is its own module: a multi-scale deformable one
can replace it behind the same inputs and outputs.
"""

import math
from typing import NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp

from detcon.models import networks

# torch.nn.Linear/Conv2d default init (kaiming_uniform with a = sqrt(5)): U(+-1/sqrt(fan_in)).
TORCH_DEFAULT_W = hk.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")
# nn.init.xavier_uniform_, which DETR's Transformer._reset_parameters applies to every matrix.
XAVIER = hk.initializers.VarianceScaling(1.0, "fan_avg", "uniform")
# xavier_uniform_ of MultiheadAttention's fused in_proj_weight [3d, d], per [d, d] slice.
XAVIER_IN_PROJ = hk.initializers.VarianceScaling(0.5, "fan_avg", "uniform")


def torch_default_bias(fan_in: int) -> hk.initializers.Initializer:
    """torch.nn.Linear/Conv2d default bias init: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return hk.initializers.RandomUniform(-bound, bound)


def torch_linear(size: int, fan_in: int, name: str, w_init=TORCH_DEFAULT_W) -> hk.Linear:
    """hk.Linear initialised like torch.nn.Linear (weights by w_init, bias U(+-1/sqrt(fan_in)))."""
    return hk.Linear(size, w_init=w_init, b_init=torch_default_bias(fan_in), name=name)


def feature_mask(pad_mask: jax.Array, height: int, width: int) -> jax.Array:
    """The image mask at feature resolution, as F.interpolate(mode='nearest') samples it:
    pad_mask [b, S, S] bool (True on image pixels) -> [b, height, width] bool."""
    rows = (jnp.arange(height) * pad_mask.shape[1]) // height
    cols = (jnp.arange(width) * pad_mask.shape[2]) // width
    return pad_mask[:, rows][:, :, cols]


def sine_position_encoding(
    mask: jax.Array, num_pos_feats: int = 128, temperature: float = 10000.0
) -> jax.Array:
    """DETReg's normalised sine encoding (models/position_encoding.py, scale 2 pi).

    mask [b, h, w] bool, True on image positions -> [b, h, w, 2 * num_pos_feats] (y then x).
    Coordinates count image positions only (cumulative sums of the mask), shifted by -0.5 and
    divided by the image extent, so every image spans (0, 2 pi) whatever its padding.
    """
    eps, scale = 1e-6, 2.0 * math.pi
    not_padded = mask.astype(jnp.float32)
    y = jnp.cumsum(not_padded, axis=1)
    x = jnp.cumsum(not_padded, axis=2)
    y = (y - 0.5) / (y[:, -1:, :] + eps) * scale
    x = (x - 0.5) / (x[:, :, -1:] + eps) * scale
    dim_t = jnp.arange(num_pos_feats, dtype=jnp.float32)
    dim_t = temperature ** (2.0 * (dim_t // 2) / num_pos_feats)

    def encode(coord: jax.Array) -> jax.Array:
        angles = coord[..., None] / dim_t  # [b, h, w, F]
        # Interleaved sin(even), cos(odd), as torch.stack((sin, cos), dim=4).flatten(3).
        pairs = jnp.stack([jnp.sin(angles[..., 0::2]), jnp.cos(angles[..., 1::2])], axis=-1)
        return pairs.reshape(angles.shape)

    return jnp.concatenate([encode(y), encode(x)], axis=-1)


def dropout(x: jax.Array, keys: Optional[jax.Array], rate: float, site: int) -> jax.Array:
    """Inverted dropout with one key per example: x [b, ...], keys [b, 2] (None: identity).

    `site` makes each dropout layer draw its own mask from the example's key.
    """
    if keys is None or rate == 0.0:
        return x
    keep = jax.vmap(
        lambda k: jax.random.bernoulli(jax.random.fold_in(k, site), 1.0 - rate, x.shape[1:])
    )(keys)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class MultiHeadAttention(hk.Module):
    """torch.nn.MultiheadAttention (batch first): q/k/v projections, scaled dot product with a key
    padding mask, dropout on the weights, output projection."""

    def __init__(self, d_model: int, num_heads: int, dropout_rate: float, name: str):
        super().__init__(name=name)
        if d_model % num_heads:
            raise ValueError(f"hidden_dim {d_model} must be a multiple of num_heads {num_heads}.")
        self._d, self._heads, self._rate = d_model, num_heads, dropout_rate

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        key_valid: Optional[jax.Array],
        keys: Optional[jax.Array],
        site: int,
    ) -> jax.Array:
        """query [b, n, d], key/value [b, m, d], key_valid [b, m] bool (None: all) -> [b, n, d]."""
        d, h = self._d, self._heads
        zeros = hk.initializers.Constant(0.0)
        proj = lambda name: hk.Linear(d, w_init=XAVIER_IN_PROJ, b_init=zeros, name=name)
        split = lambda t: t.reshape(t.shape[:2] + (h, d // h))
        q = split(proj("q_proj")(query)) * (d // h) ** -0.5
        k = split(proj("k_proj")(key))
        v = split(proj("v_proj")(value))
        logits = jnp.einsum("bnhc,bmhc->bhnm", q, k)
        if key_valid is not None:
            # Finite, unlike torch's -inf: the same softmax, and no NaN if a row were all padding.
            logits = jnp.where(key_valid[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
        weights = dropout(jax.nn.softmax(logits, axis=-1), keys, self._rate, site)
        out = jnp.einsum("bhnm,bmhc->bnhc", weights, v).reshape(query.shape[:2] + (d,))
        return hk.Linear(d, w_init=XAVIER, b_init=zeros, name="out_proj")(out)


def _layer_norm(name: str) -> hk.LayerNorm:
    """torch.nn.LayerNorm(d): eps 1e-5, scale 1, offset 0."""
    return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-5, name=name)


class TransformerConfig(NamedTuple):
    """DETR transformer sizes (DETReg `configs/DETReg_top30_in_detr.sh` + util/default_args.py)."""

    hidden_dim: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = True


class _FeedForward(hk.Module):
    """linear1 -> ReLU -> dropout -> linear2 (xavier weights, torch default biases)."""

    def __init__(self, d_model: int, hidden: int, rate: float, name: str):
        super().__init__(name=name)
        self._d, self._hidden, self._rate = d_model, hidden, rate

    def __call__(self, x: jax.Array, keys: Optional[jax.Array], site: int) -> jax.Array:
        x = jax.nn.relu(torch_linear(self._hidden, self._d, "linear1", XAVIER)(x))
        x = dropout(x, keys, self._rate, site)
        return torch_linear(self._d, self._hidden, "linear2", XAVIER)(x)


class EncoderLayer(hk.Module):
    """TransformerEncoderLayer: self-attention with position on q and k, then the FFN."""

    def __init__(self, cfg: TransformerConfig, index: int, name: str):
        super().__init__(name=name)
        self._cfg, self._site = cfg, 100 * (index + 1)

    def __call__(self, src, pos, valid, keys):
        cfg, s = self._cfg, self._site
        attn = MultiHeadAttention(cfg.hidden_dim, cfg.num_heads, cfg.dropout, "self_attn")
        ffn = _FeedForward(cfg.hidden_dim, cfg.dim_feedforward, cfg.dropout, "ffn")
        norm1, norm2 = _layer_norm("norm1"), _layer_norm("norm2")
        if cfg.pre_norm:
            x = norm1(src)
            src = src + dropout(attn(x + pos, x + pos, x, valid, keys, s), keys, cfg.dropout, s + 1)
            x = norm2(src)
            return src + dropout(ffn(x, keys, s + 2), keys, cfg.dropout, s + 3)
        x = attn(src + pos, src + pos, src, valid, keys, s)
        src = norm1(src + dropout(x, keys, cfg.dropout, s + 1))
        return norm2(src + dropout(ffn(src, keys, s + 2), keys, cfg.dropout, s + 3))


class DecoderLayer(hk.Module):
    """TransformerDecoderLayer: self-attention of the queries, cross-attention to the memory, FFN."""

    def __init__(self, cfg: TransformerConfig, index: int, name: str):
        super().__init__(name=name)
        self._cfg, self._site = cfg, 10_000 + 100 * (index + 1)

    def __call__(self, tgt, memory, pos, query_pos, valid, keys):
        cfg, s = self._cfg, self._site
        self_attn = MultiHeadAttention(cfg.hidden_dim, cfg.num_heads, cfg.dropout, "self_attn")
        cross = MultiHeadAttention(cfg.hidden_dim, cfg.num_heads, cfg.dropout, "multihead_attn")
        ffn = _FeedForward(cfg.hidden_dim, cfg.dim_feedforward, cfg.dropout, "ffn")
        norm1, norm2, norm3 = _layer_norm("norm1"), _layer_norm("norm2"), _layer_norm("norm3")
        drop = lambda x, i: dropout(x, keys, cfg.dropout, s + i)
        if cfg.pre_norm:
            x = norm1(tgt)
            tgt = tgt + drop(self_attn(x + query_pos, x + query_pos, x, None, keys, s), 1)
            x = norm2(tgt)
            tgt = tgt + drop(cross(x + query_pos, memory + pos, memory, valid, keys, s + 2), 3)
            x = norm3(tgt)
            return tgt + drop(ffn(x, keys, s + 4), 5)
        x = self_attn(tgt + query_pos, tgt + query_pos, tgt, None, keys, s)
        tgt = norm1(tgt + drop(x, 1))
        x = cross(tgt + query_pos, memory + pos, memory, valid, keys, s + 2)
        tgt = norm2(tgt + drop(x, 3))
        return norm3(tgt + drop(ffn(tgt, keys, s + 4), 5))


class Transformer(hk.Module):
    """DETR's encoder-decoder: src [b, n, d] tokens, pos [b, n, d], valid [b, n] bool, query_pos
    [b, Q, d] -> decoder outputs of every layer through the shared final LayerNorm [L, b, Q, d]."""

    def __init__(self, cfg: TransformerConfig, name: str = "transformer"):
        super().__init__(name=name)
        self._cfg = cfg

    def __call__(self, src, pos, valid, query_pos, keys):
        cfg = self._cfg
        memory = src
        for i in range(cfg.num_encoder_layers):
            memory = EncoderLayer(cfg, i, f"encoder_layer_{i}")(memory, pos, valid, keys)
        if cfg.pre_norm:  # TransformerEncoder's final norm exists only with normalize_before
            memory = _layer_norm("encoder_norm")(memory)
        decoder_norm = _layer_norm("decoder_norm")
        tgt = jnp.zeros_like(query_pos)
        outputs = []
        for i in range(cfg.num_decoder_layers):
            tgt = DecoderLayer(cfg, i, f"decoder_layer_{i}")(
                tgt, memory, pos, query_pos, valid, keys
            )
            outputs.append(decoder_norm(tgt))
        return jnp.stack(outputs)


class HeadMLP(hk.Module):
    """DETR's MLP: Linear layers with ReLU between (torch default init): [..., d] -> [..., out]."""

    def __init__(self, hidden: int, output: int, num_layers: int, name: str):
        super().__init__(name=name)
        self._sizes = [hidden] * (num_layers - 1) + [output]

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, size in enumerate(self._sizes):
            x = torch_linear(size, x.shape[-1], f"layers_{i}")(x)
            if i < len(self._sizes) - 1:
                x = jax.nn.relu(x)
        return x


class DetectorInputs(NamedTuple):
    """One view for the detector: a padded canvas, its mask, region crops and dropout keys."""

    images: jax.Array  # [b, S, S, 3] ImageNet-normalised, zeros outside the image
    pad_mask: jax.Array  # [b, S, S] bool, True on image pixels
    crops: jax.Array  # [b, k, c, c, 3] ImageNet-normalised region crops (embedding targets)
    dropout_keys: jax.Array  # [b, 2] uint32, one key per example


class DetectorOutputs(NamedTuple):
    """Per decoder layer logits and boxes, last-layer embeddings, the regions' target embeddings."""

    pred_logits: jax.Array  # [L, b, Q, num_classes + 1]
    pred_boxes: jax.Array  # [L, b, Q, 4] cxcywh in (0, 1)
    pred_embed: jax.Array  # [b, Q, E]
    target_embed: jax.Array  # [b, k, E] frozen torso res3, average-pooled, stop-gradient
    logits: jax.Array  # [b, probe classes] online probe on pooled C5 (stop-gradient)


class DetectorConfig(NamedTuple):
    """What the detector is built from, besides the transformer."""

    depth: int  # the frozen ResNet torso (config.model.depth)
    width_multiplier: int
    num_queries: int  # 100 in the DETR variant
    num_classes: int  # class_embed has num_classes + 1 outputs (the last: no object)
    embed_dim: int  # object-embedding width: the torso's res3 channels
    probe_classes: int  # the online linear probe's classes


def detection_head(
    c5: jax.Array,
    pad_mask: jax.Array,
    dropout_keys: Optional[jax.Array],
    num_queries: int,
    num_classes: int,
    tcfg: TransformerConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DETR on a C5 map (inside a transform): c5 [b, h, w, C], pad_mask [b, S, S] bool, dropout
    keys [b, 2] (None: no dropout) -> (logits [L, b, Q, num_classes + 1], boxes [L, b, Q, 4]
    cxcywh, decoder outputs [L, b, Q, d]).

    Modules 'input_proj', 'query_embed', 'transformer', 'class_embed' and 'bbox_embed' sit
    where this is called, so a head built on precomputed maps shares the detector's names.
    """
    d = tcfg.hidden_dim
    b, h, w, channels = c5.shape
    src = hk.Conv2D(
        d,
        kernel_shape=1,
        w_init=TORCH_DEFAULT_W,
        b_init=torch_default_bias(channels),
        name="input_proj",
    )(c5)
    valid = feature_mask(pad_mask, h, w)
    pos = sine_position_encoding(valid, d // 2)
    # nn.Embedding's init: N(0, 1).
    query_embed = hk.Embed(
        num_queries, d, w_init=hk.initializers.RandomNormal(1.0), name="query_embed"
    ).embeddings
    query_pos = jnp.broadcast_to(query_embed, (b, num_queries, d))
    hs = Transformer(tcfg)(
        src.reshape(b, h * w, d),
        pos.reshape(b, h * w, d),
        valid.reshape(b, h * w),
        query_pos,
        dropout_keys,
    )
    pred_logits = torch_linear(num_classes + 1, d, "class_embed")(hs)
    pred_boxes = jax.nn.sigmoid(HeadMLP(d, 4, 3, "bbox_embed")(hs))
    return pred_logits, pred_boxes, hs


def detector_forward(
    inputs: DetectorInputs, is_training: bool, cfg: DetectorConfig, tcfg: TransformerConfig
) -> DetectorOutputs:
    """The detector's forward pass (inside hk.transform_with_state).

    Modules sit at the top of the parameter tree ('res_net{depth}', 'input_proj',
    'query_embed', 'transformer', 'class_embed', 'bbox_embed', 'feature_embed', 'classifier'),
    so the torso loader and the exporters find the torso where every method keeps it.
    """
    # One torso module for the image and the crops: the same frozen weights, inference BN.
    torso = networks.ResNetTorso(cfg.depth, cfg.width_multiplier, axis_name=None)
    # Training mode only while initialising, to create the BatchNorm statistics (Haiku creates
    # them there); make_detector resets them. Every apply is in inference mode.
    frozen_bn_training = hk.running_init()
    c5 = jax.lax.stop_gradient(torso(inputs.images, is_training=frozen_bn_training))
    keys = inputs.dropout_keys if is_training else None
    head = detection_head(c5, inputs.pad_mask, keys, cfg.num_queries, cfg.num_classes, tcfg)
    pred_logits, pred_boxes, hs = head
    pred_embed = HeadMLP(tcfg.hidden_dim, cfg.embed_dim, 2, "feature_embed")(hs[-1])

    b, k, c = inputs.crops.shape[:3]
    crops = inputs.crops.reshape((b * k, c, c, 3))
    res3 = torso(crops, is_training=frozen_bn_training, return_stages=True)[1]
    target_embed = jax.lax.stop_gradient(jnp.mean(res3, axis=(1, 2)).reshape(b, k, -1))

    logits = networks.LinearClassifier(cfg.probe_classes)(jnp.mean(c5, axis=(1, 2)))
    return DetectorOutputs(pred_logits, pred_boxes, pred_embed, target_embed, logits)


def reset_batch_norm_statistics(state: dict) -> dict:
    """BatchNorm moving averages set to PyTorch's initial running statistics (mean 0, var 1), so
    a randomly initialised frozen torso in inference mode neither divides by sqrt(eps) nor keeps
    the statistics of the blank image it was initialised on."""

    def reset(module: str, name: str, value: jax.Array) -> jax.Array:
        if name not in ("average", "hidden"):
            return value
        return jnp.ones_like(value) if module.endswith("var_ema") else jnp.zeros_like(value)

    return {m: {n: reset(m, n, v) for n, v in leaves.items()} for m, leaves in state.items()}


def make_detector(cfg: DetectorConfig, tcfg: TransformerConfig) -> hk.TransformedWithState:
    """init/apply of `forward(inputs, is_training)` -> DetectorOutputs; init resets BatchNorm
    statistics (reset_batch_norm_statistics)."""
    transformed = hk.transform_with_state(
        lambda inputs, is_training, **unused: detector_forward(inputs, is_training, cfg, tcfg)
    )

    def init(rng, inputs, is_training, **kwargs):
        params, state = transformed.init(rng, inputs, is_training, **kwargs)
        return params, reset_batch_norm_statistics(state)

    return hk.TransformedWithState(init, transformed.apply)
