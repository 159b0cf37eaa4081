"""ResNet v1 torsos and MLP heads in Haiku, named like DeepMind's BYOL and DetCon releases."""
from typing import Any, Mapping, Optional, Sequence

import haiku as hk
import jax

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
        channels = (256, 512, 1024, 2048) if bottleneck else (64, 128, 256, 512)
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

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        """Returns the stride-32 feature map [N, h, w, C]."""
        x = self._initial_conv(x)
        x = jax.nn.relu(self._initial_bn(x, is_training=is_training))
        x = hk.max_pool(x, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding="SAME")
        for group in self._groups:
            x = group(x, is_training, False)
        return x


class MLP(hk.Module):
    """Projector / predictor: Linear(hidden) -> BatchNorm -> ReLU -> Linear(out, no bias)."""

    def __init__(self, hidden_size: int = 4096, output_size: int = 256,
                 axis_name: Optional[str] = None, bn_decay_rate: float = 0.9,
                 name: Optional[str] = None):
        super().__init__(name=name)
        self._hidden_size = hidden_size
        self._output_size = output_size
        self._bn = bn_config(axis_name, decay_rate=bn_decay_rate)

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        """[..., D_in] -> [..., output_size]; BatchNorm statistics over all leading axes."""
        lead = x.shape[:-1]
        x = x.reshape((-1, x.shape[-1]))
        x = hk.Linear(self._hidden_size, with_bias=True)(x)
        x = jax.nn.relu(hk.BatchNorm(**self._bn)(x, is_training=is_training))
        x = hk.Linear(self._output_size, with_bias=False)(x)
        return x.reshape(lead + (self._output_size,))


class LinearClassifier(hk.Module):
    """Online linear probe on stop-gradient pooled features: [N, C] -> [N, num_classes]."""

    def __init__(self, num_classes: int, name: Optional[str] = "classifier"):
        super().__init__(name=name)
        self._num_classes = num_classes

    def __call__(self, features: jax.Array) -> jax.Array:
        # Haiku's default initialiser (truncated normal, std 1/sqrt(C)), as the released classifier.
        return hk.Linear(self._num_classes)(jax.lax.stop_gradient(features))


def torso_fn(depth: int, width_multiplier: int = 1, axis_name: Optional[str] = None
             ) -> Any:
    """A transform_with_state pair for the bare torso (used by export and benchmarks)."""
    def forward(images: jax.Array, is_training: bool) -> jax.Array:
        return ResNetTorso(depth, width_multiplier, axis_name)(images, is_training)
    return hk.transform_with_state(forward)
