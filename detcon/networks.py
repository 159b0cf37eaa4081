"""ResNet v1 torsos and MLP heads in Haiku, named like DeepMind's BYOL and DetCon releases."""
from typing import Any, Mapping, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

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


def bn_config(axis_name: Optional[str], decay_rate: float = 0.9, eps: float = 1e-5) -> dict:
    """BatchNorm kwargs with cross-replica statistics over `axis_name` (None: local batch)."""
    return dict(decay_rate=decay_rate, eps=eps, create_scale=True, create_offset=True,
                cross_replica_axis=axis_name)


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

    def __init__(self, depth: int, width_multiplier: int = 1, axis_name: Optional[str] = None,
                 bn_decay_rate: float = 0.9, name: Optional[str] = None):
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {depth}.")
        if not 1 <= width_multiplier <= 4:
            raise ValueError(f"width_multiplier must be in 1..4, got {width_multiplier}.")
        super().__init__(name=name or resnet_name(depth))
        blocks, bottleneck = RESNET_DEPTHS[depth]
        channels = stage_channels(depth)
        cfg = bn_config(axis_name, decay_rate=bn_decay_rate)
        self._initial_conv = hk.Conv2D(64 * width_multiplier, kernel_shape=7, stride=2,
                                       with_bias=False, padding="SAME", name="initial_conv")
        self._initial_bn = hk.BatchNorm(name="initial_batchnorm", **cfg)
        # Haiku's own block groups; v1 bottlenecks stride in the 3x3 conv (conv_1).
        self._groups = [
            hk.nets.ResNet.BlockGroup(
                channels=width_multiplier * channels[i], num_blocks=blocks[i],
                stride=(1, 2, 2, 2)[i], bn_config=cfg, resnet_v2=False, bottleneck=bottleneck,
                use_projection=bottleneck or i > 0, name=f"block_group_{i}")
            for i in range(4)
        ]

    def __call__(self, x: jax.Array, is_training: bool, return_stages: bool = False
                 ) -> jax.Array | tuple[jax.Array, ...]:
        """The stride-32 feature map [N, h, w, C], or with return_stages the outputs of all four
        block groups (res2..res5, strides 4, 8, 16, 32) from the same pass and parameters."""
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

    def __init__(self, hidden_size: int = 4096, output_size: int = 256,
                 axis_name: Optional[str] = None, bn_decay_rate: float = 0.9,
                 final_batch_norm: bool = False, name: Optional[str] = None):
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
        return hk.Linear(self._num_classes, w_init=jnp.zeros)(jax.lax.stop_gradient(features))


def torso_fn(depth: int, width_multiplier: int = 1, axis_name: Optional[str] = None
             ) -> Any:
    """A transform_with_state pair for the bare torso (used by export and benchmarks)."""
    def forward(images: jax.Array, is_training: bool) -> jax.Array:
        return ResNetTorso(depth, width_multiplier, axis_name)(images, is_training)
    return hk.transform_with_state(forward)


def per_view_batch_norm(num_views: int) -> Any:
    """Context (inside a transform) in which every hk.BatchNorm normalises each of `num_views`
    equal leading chunks of its input separately, updating its averages chunk after chunk.

    Lets both views run through a network as one batch [V*N, ...] (one conv per layer, twice the
    GEMM size) while BatchNorm statistics and moving averages stay exactly those of one pass per
    view, as the official releases compute them.
    """
    def interceptor(next_f, args, kwargs, context):
        if num_views == 1 or context.method_name != "__call__" or not isinstance(
                context.module, hk.BatchNorm):
            return next_f(*args, **kwargs)
        inputs, rest = args[0], args[1:]
        chunks = jnp.split(inputs, num_views, axis=0)
        return jnp.concatenate([next_f(chunk, *rest, **kwargs) for chunk in chunks], axis=0)

    return hk.intercept_methods(interceptor)
