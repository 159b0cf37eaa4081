"""Convolutions as one patch matmul on CPU, where XLA's native conv is erratic and slow.

XLA:CPU (jaxlib 0.10, 2 cores) runs the forward and backward of a 3x3 SAME conv on a 2x2x512
map in 1.9 s and on a 32x32x64 map in 2.3 s, 20-50x below its rate on neighbouring shapes; the
first is ResNet's last stage at 64 px, the second its first stage at 128 px. Written as explicit
padding, strided slices and one [N*h*w, kh*kw*C] @ [kh*kw*C, O] dot, each layer runs at the
dot's rate: the study's ResNet-10 BYOL step at 64 px takes 0.96 s instead of 4.7 s
(`scripts/benchmark.py --what=step,convs`; docs/performance.md). Parameters, their names,
shapes and initialisers are Haiku's own; only the order of the sums differs. GPUs and TPUs
keep the native conv.
"""

import contextlib
import math
from typing import Any, ContextManager, Optional

import haiku as hk
import jax
import jax.numpy as jnp


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA's SAME padding (low, high) of one spatial axis, as lax.conv_general_dilated pads."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def patch_conv(x: jax.Array, w: jax.Array, stride: int, padding: str) -> jax.Array:
    """NHWC conv of x [N, H, W, C] with HWIO w [kh, kw, C, O] via one matmul -> [N, h, w, O]."""
    kh, kw, channels, outputs = w.shape
    if padding == "SAME":
        pads = (same_padding(x.shape[1], kh, stride), same_padding(x.shape[2], kw, stride))
    elif padding == "VALID":
        pads = ((0, 0), (0, 0))
    else:
        raise ValueError(f"patch_conv: padding must be 'SAME' or 'VALID', got {padding!r}.")
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    taps = [
        x[:, i : i + (out_h - 1) * stride + 1 : stride, j : j + (out_w - 1) * stride + 1 : stride]
        for i in range(kh)
        for j in range(kw)
    ]
    # Tap-major, channel-minor: the order of w's flattened (kh, kw, C) leading axes.
    patches = jnp.concatenate(taps, axis=-1)
    return jnp.dot(patches, w.reshape(kh * kw * channels, outputs))


def _plain_conv2d(module: hk.Conv2D, x: jax.Array) -> Optional[tuple[int, str]]:
    """(stride, padding) when `module` is a plain NHWC Conv2D the patch path reproduces."""
    stride = set(module.stride)
    if (
        module.num_spatial_dims != 2
        or module.channel_index != -1
        or len(stride) != 1
        or set(module.kernel_dilation) != {1}
        or set(module.lhs_dilation) != {1}
        or module.feature_group_count != 1
        or module.mask is not None
        or not isinstance(module.padding, str)
        or module.padding not in ("SAME", "VALID")
        or x.ndim != 4
    ):
        return None
    return stride.pop(), module.padding


def _conv_call(module: hk.Conv2D, x: jax.Array, stride: int, padding: str) -> jax.Array:
    """hk.Conv2D.__call__ through patch_conv: the same parameters, names and initialisers."""
    w_shape = tuple(module.kernel_shape) + (x.shape[-1], module.output_channels)
    w_init = module.w_init
    if w_init is None:  # Haiku's ConvND default
        w_init = hk.initializers.TruncatedNormal(1.0 / math.sqrt(math.prod(w_shape[:-1])))
    w = hk.get_parameter("w", w_shape, x.dtype, init=w_init)
    out = patch_conv(x, w, stride, padding)
    if module.with_bias:
        out = out + hk.get_parameter("b", (module.output_channels,), x.dtype, init=module.b_init)
    return out


def use_patch_conv(module: hk.Module, x: jax.Array, platform: str) -> bool:
    """Whether this call takes the patch path: on CPU, a plain NHWC hk.Conv2D."""
    return (
        platform == "cpu" and isinstance(module, hk.Conv2D) and _plain_conv2d(module, x) is not None
    )


def cpu_patch_convs() -> ContextManager:
    """Context (inside a transform) running every plain hk.Conv2D as a patch matmul when JAX's
    default backend, the one being traced for, is the CPU; elsewhere it does nothing."""
    platform = jax.default_backend()
    if platform != "cpu":
        return contextlib.nullcontext()

    def interceptor(next_f: Any, args: tuple, kwargs: dict, context: Any) -> jax.Array:
        if context.method_name != "__call__" or kwargs or len(args) != 1:
            return next_f(*args, **kwargs)
        module, x = context.module, args[0]
        if not use_patch_conv(module, x, platform):
            return next_f(*args, **kwargs)
        return _conv_call(module, x, *_plain_conv2d(module, x))

    return hk.intercept_methods(interceptor)
