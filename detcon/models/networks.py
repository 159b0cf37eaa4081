"""ResNet v1 torsos and MLP heads in Haiku, named like DeepMind's BYOL and DetCon releases."""

import contextlib
import math
from typing import Any, ContextManager, Mapping, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from detcon.models import patch_conv

# depth -> (blocks per group, bottleneck blocks?)
RESNET_DEPTHS: Mapping[int, tuple[Sequence[int], bool]] = {
    10: ((1, 1, 1, 1), False),  # for fast CPU tests and smoke runs
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
    200: ((3, 24, 36, 3), True),
}


# haiku: Haiku's defaults, as the DeepMind releases (convs and linears truncated normal
# 1/sqrt(fan_in), the last BatchNorm scale of each residual block zero). torchvision:
# torchvision/models/resnet.py (convs Kaiming-normal fan_out, every BatchNorm scale 1, no
# zero-init residual) and PyTorch's default nn.Linear (weight and bias U(+-1/sqrt(fan_in))), as
# MoCo v2 and DetCo build them. densecl: DenseCL's openselfsup ResNet.init_weights (convs mmcv
# kaiming_init fan_in normal, BatchNorm 1) and DenseCLNeck (its Linear layers Kaiming-normal
# fan_in with zero bias, init_linear='kaiming'; its 1x1 convs PyTorch's default).
INIT_SCHEMES = ("haiku", "torchvision", "densecl")
# Modules that are ours, not a release's: the online probe keeps Haiku's initialiser everywhere.
_OWN_MODULES = ("classifier",)


def _uniform_fan_in(fan_in: int) -> hk.initializers.Initializer:
    """PyTorch's default nn.Linear/nn.Conv2d weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return hk.initializers.RandomUniform(-bound, bound)


def _kaiming_normal(fan: int) -> hk.initializers.Initializer:
    """Kaiming normal for ReLU: an untruncated normal of std sqrt(2 / fan)."""
    return hk.initializers.RandomNormal(stddev=math.sqrt(2.0 / fan))


def _release_init(
    scheme: str, module: hk.Module, leaf: str, shape: Sequence[int]
) -> Optional[hk.initializers.Initializer]:
    """The release's initialiser of one parameter, or None to keep the module's own."""
    path = module.module_name
    if any(part in _OWN_MODULES for part in path.split("/")):
        return None
    if isinstance(module, hk.BatchNorm):
        # No zero-init residual in torchvision's default nor DenseCL's: every scale starts at 1.
        return hk.initializers.Constant(1.0) if leaf == "scale" else None
    if isinstance(module, hk.Conv2D) and leaf == "w":
        kh, kw, fan_in_channels, out = shape
        fan = kh * kw * (out if scheme == "torchvision" else fan_in_channels)
        return _kaiming_normal(fan)
    if isinstance(module, hk.Linear):
        fan_in = module.input_size
        if scheme == "densecl" and "dense_head" not in path:
            return _kaiming_normal(fan_in) if leaf == "w" else hk.initializers.Constant(0.0)
        return _uniform_fan_in(fan_in)
    return None


def check_init_scheme(scheme: str) -> None:
    """Raises ValueError naming the config field unless `scheme` is one of INIT_SCHEMES."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"--config.model.init={scheme!r}: choose one of {INIT_SCHEMES}.")


def init_scheme(scheme: str) -> ContextManager:
    """Context (inside a transform) creating parameters with `scheme`'s initialisers
    (INIT_SCHEMES); 'haiku' changes nothing. Shapes and names are unchanged."""
    check_init_scheme(scheme)
    if scheme == "haiku":
        return contextlib.nullcontext()

    def creator(next_creator, shape, dtype, init, context):
        leaf = context.full_name.rsplit("/", 1)[-1]
        release = _release_init(scheme, context.module, leaf, shape)
        return next_creator(shape, dtype, init if release is None else release)

    return hk.custom_creator(creator)


def bn_config(axis_name: Optional[str], decay_rate: float = 0.9, eps: float = 1e-5) -> dict:
    """BatchNorm kwargs with cross-replica statistics over `axis_name` (None: local batch)."""
    return dict(
        decay_rate=decay_rate,
        eps=eps,
        create_scale=True,
        create_offset=True,
        cross_replica_axis=axis_name,
    )


def stage_channels(depth: int, width_multiplier: int = 1) -> tuple[int, int, int, int]:
    """Output channels of the four block groups (res2..res5), e.g. ResNet-50: 256 ... 2048."""
    _, bottleneck = RESNET_DEPTHS[depth]
    channels = (256, 512, 1024, 2048) if bottleneck else (64, 128, 256, 512)
    return tuple(width_multiplier * c for c in channels)


def resnet_name(depth: int) -> str:
    """Haiku module name of the torso, e.g. 'res_net50' (matches the released checkpoints)."""
    return f"res_net{depth}"


class ResNetTorso(hk.Module):
    """ResNet v1 without pooling or logits: [N, H, W, 3] -> [N, H/32, W/32, C]."""

    def __init__(
        self,
        depth: int,
        width_multiplier: int = 1,
        axis_name: Optional[str] = None,
        bn_decay_rate: float = 0.9,
        name: Optional[str] = None,
    ):
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}.")
        if not 1 <= width_multiplier <= 4:
            raise ValueError(f"width_multiplier must be in 1..4, got {width_multiplier}.")
        super().__init__(name=name or resnet_name(depth))
        blocks, bottleneck = RESNET_DEPTHS[depth]
        channels = stage_channels(depth)
        cfg = bn_config(axis_name, decay_rate=bn_decay_rate)
        self._initial_conv = hk.Conv2D(
            64 * width_multiplier,
            kernel_shape=7,
            stride=2,
            with_bias=False,
            padding="SAME",
            name="initial_conv",
        )
        self._initial_bn = hk.BatchNorm(name="initial_batchnorm", **cfg)
        # Haiku's own block groups; v1 bottlenecks stride in the 3x3 conv (conv_1).
        self._groups = [
            hk.nets.ResNet.BlockGroup(
                channels=width_multiplier * channels[i],
                num_blocks=blocks[i],
                stride=(1, 2, 2, 2)[i],
                bn_config=cfg,
                resnet_v2=False,
                bottleneck=bottleneck,
                use_projection=bottleneck or i > 0,
                name=f"block_group_{i}",
            )
            for i in range(4)
        ]

    def __call__(
        self, x: jax.Array, is_training: bool, return_stages: bool = False
    ) -> jax.Array | tuple[jax.Array, ...]:
        """The stride-32 feature map [N, h, w, C], or with return_stages the outputs of all four
        block groups (res2..res5, strides 4, 8, 16, 32) from the same pass and parameters."""
        with patch_conv.cpu_patch_convs():
            x = self._initial_conv(x)
            x = jax.nn.relu(self._initial_bn(x, is_training=is_training))
            x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
            stages = []
            for group in self._groups:
                x = group(x, is_training, False)
                stages.append(x)
        return tuple(stages) if return_stages else x


class MLP(hk.Module):
    """Projector / predictor: Linear(hidden) -> BatchNorm -> ReLU -> Linear(out, no bias).

    final_batch_norm adds SimCLR's last BatchNorm (scale, no offset: the layer has no bias).
    """

    def __init__(
        self,
        hidden_size: int = 4096,
        output_size: int = 256,
        axis_name: Optional[str] = None,
        bn_decay_rate: float = 0.9,
        final_batch_norm: bool = False,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        self._hidden_size = hidden_size
        self._output_size = output_size
        self._bn = bn_config(axis_name, decay_rate=bn_decay_rate)
        self._final_batch_norm = final_batch_norm

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        """[..., D_in] -> [..., output_size]; BatchNorm statistics over all leading axes."""
        lead = x.shape[:-1]
        x = x.reshape((-1, x.shape[-1]))
        x = hk.Linear(self._hidden_size, with_bias=True)(x)
        x = jax.nn.relu(hk.BatchNorm(**self._bn)(x, is_training=is_training))
        x = hk.Linear(self._output_size, with_bias=False)(x)
        if self._final_batch_norm:
            final = dict(self._bn, create_offset=False)
            x = hk.BatchNorm(name="final_batch_norm", **final)(x, is_training=is_training)
        return x.reshape(lead + (self._output_size,))


class ReluMLP(hk.Module):
    """MoCo v2 / DenseCL / DetCo head: Linear(hidden) -> ReLU -> Linear(out), biases, no BatchNorm.

    Acts on the last axis, so on a feature map [N, h, w, C] it is the 1x1-conv head of DenseCL.
    """

    def __init__(self, hidden_size: int, output_size: int, name: Optional[str] = None):
        super().__init__(name=name)
        self._hidden_size = hidden_size
        self._output_size = output_size

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., D_in] -> [..., output_size]."""
        x = jax.nn.relu(hk.Linear(self._hidden_size, with_bias=True)(x))
        return hk.Linear(self._output_size, with_bias=True)(x)


class LinearClassifier(hk.Module):
    """Online linear probe on stop-gradient pooled features: [N, C] -> [N, num_classes]."""

    def __init__(self, num_classes: int, name: Optional[str] = "classifier"):
        super().__init__(name=name)
        self._num_classes = num_classes

    def __call__(self, features: jax.Array) -> jax.Array:
        # Haiku's default initialiser (truncated normal, std 1/sqrt(C)), as the released classifier.
        return hk.Linear(self._num_classes)(jax.lax.stop_gradient(features))


def torso_fn(depth: int, width_multiplier: int = 1, axis_name: Optional[str] = None) -> Any:
    """A transform_with_state pair for the bare torso (used by export and benchmarks)."""

    def forward(images: jax.Array, is_training: bool) -> jax.Array:
        return ResNetTorso(depth, width_multiplier, axis_name)(images, is_training)

    return hk.transform_with_state(forward)


def _batch_norm_train(
    module: hk.BatchNorm, inputs: jax.Array, num_views: int, apply_dtype: jnp.dtype
) -> jax.Array:
    """hk.BatchNorm's training-mode forward with statistics per view: [V*N, ..., C] -> same.

    Statistics are fp32 (E[x^2] - E[x]^2, as Haiku) over each of the num_views leading chunks,
    and the moving averages take one update per view in order, as one call per view would.
    The normalisation runs in apply_dtype: in bfloat16 it is x * a + b with a, b folded in fp32,
    so the activations kept for the backward pass stay bf16.
    """
    views = inputs.reshape((num_views, -1) + inputs.shape[1:])
    axes = tuple(range(1, views.ndim - 1))
    as_f32 = views.astype(jnp.float32)
    mean = jnp.mean(as_f32, axes, keepdims=True)
    mean_of_squares = jnp.mean(jnp.square(as_f32), axes, keepdims=True)
    if module.cross_replica_axis:
        mean, mean_of_squares = jax.lax.pmean(
            (mean, mean_of_squares),
            axis_name=module.cross_replica_axis,
            axis_index_groups=module.cross_replica_axis_index_groups,
        )
    var = mean_of_squares - jnp.square(mean)
    for view in range(num_views):
        module.mean_ema(mean[view].astype(inputs.dtype))
        module.var_ema(var[view].astype(inputs.dtype))
    w_shape = (1,) * (inputs.ndim - 1) + inputs.shape[-1:]
    scale = (
        hk.get_parameter("scale", w_shape, inputs.dtype, module.scale_init)
        if module.create_scale
        else jnp.ones([], inputs.dtype)
    )
    offset = (
        hk.get_parameter("offset", w_shape, inputs.dtype, module.offset_init)
        if module.create_offset
        else jnp.zeros([], inputs.dtype)
    )
    inv = scale * jax.lax.rsqrt(var + jnp.asarray(module.eps, var.dtype))
    if jnp.dtype(apply_dtype) == jnp.float32:
        out = (as_f32 - mean) * inv + offset  # Haiku's own expression
    else:
        shift = offset - mean * inv
        out = views.astype(apply_dtype) * inv.astype(apply_dtype) + shift.astype(apply_dtype)
    return out.reshape(inputs.shape).astype(inputs.dtype)


def batch_norm_mode(num_views: int = 1, apply_dtype: jnp.dtype = jnp.float32) -> Any:
    """Context (inside a transform) changing how every hk.BatchNorm trains, same parameters.

    num_views > 1: the input holds that many views stacked along the batch, and each is
    normalised with its own statistics, so both views can run through a network as one batch
    (one conv per layer, twice the GEMM size) with the numbers of one pass per view, as the
    official releases normalise. apply_dtype bfloat16: fp32 statistics, bf16 normalisation (see
    _batch_norm_train). Inference, and fp32 with one view, stay Haiku's own code.
    """

    def interceptor(next_f, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, hk.BatchNorm):
            return next_f(*args, **kwargs)
        bound = dict(
            zip(("inputs", "is_training", "test_local_stats", "scale", "offset"), args), **kwargs
        )
        plain = num_views == 1 and jnp.dtype(apply_dtype) == jnp.float32
        if (
            plain
            or not bound["is_training"]
            or bound.get("test_local_stats")
            or bound.get("scale") is not None
            or bound.get("offset") is not None
        ):
            return next_f(*args, **kwargs)
        return _batch_norm_train(context.module, bound["inputs"], num_views, apply_dtype)

    return hk.intercept_methods(interceptor)
