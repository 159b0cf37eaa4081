"""Each ResNet conv layer's forward and backward: XLA's native conv against the patch matmul."""

import statistics
import time
from typing import Any, Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from detcon.models import networks, patch_conv

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def torso_conv_shapes(depth: int, image_size: int) -> list[dict[str, Any]]:
    """The distinct conv layers of the torso at image_size: input [H, W, C], kernel, stride,
    padding, output channels and the first layer's name, in network order."""
    seen: dict[tuple, dict[str, Any]] = {}

    def record(next_f, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, hk.Conv2D):
            x = args[0]
            key = (
                tuple(x.shape[1:]),
                module.kernel_shape[0],
                module.stride[0],
                module.padding,
                module.output_channels,
            )
            seen.setdefault(key, dict(layer=module.module_name, count=0))["count"] += 1
        return next_f(*args, **kwargs)

    def forward(images: jax.Array) -> jax.Array:
        with hk.intercept_methods(record):
            return networks.ResNetTorso(depth)(images, is_training=True)

    jax.eval_shape(
        lambda x: hk.transform_with_state(forward).init(jax.random.PRNGKey(0), x),
        jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32),
    )
    return [
        dict(
            input_shape=list(key[0]),
            kernel=key[1],
            stride=key[2],
            padding=key[3],
            output_channels=key[4],
            **info,
        )
        for key, info in seen.items()
    ]


def _native(stride: int, padding: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    return lambda x, w: jax.lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=_DIMENSIONS
    )


def _patch(stride: int, padding: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    return lambda x, w: patch_conv.patch_conv(x, w, stride, padding)


def _time(fn: Callable, args: tuple, repeats: int) -> float:
    """Median seconds of fn(*args) after one untimed call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark_convs(depth: int, image_size: int, batch: int, repeats: int) -> list[dict[str, Any]]:
    """Forward+backward ms of every distinct torso conv at [batch, ...], native and patch, with
    the largest difference of their outputs relative to the largest output."""
    rows = []
    for layer in torso_conv_shapes(depth, image_size):
        kx, kw = jax.random.split(jax.random.PRNGKey(len(rows)))
        x = jax.random.normal(kx, (batch, *layer["input_shape"]))
        w = jax.random.normal(kw, (layer["kernel"],) * 2 + (x.shape[-1], layer["output_channels"]))
        stride, padding = layer["stride"], layer["padding"]
        row = dict(layer, batch=batch)
        outputs = {}
        for name, conv in (
            ("native", _native(stride, padding)),
            ("patch", _patch(stride, padding)),
        ):
            outputs[name] = np.asarray(jax.jit(conv)(x, w))
            step = jax.jit(jax.value_and_grad(lambda x, w, c=conv: jnp.sum(c(x, w) ** 2), (0, 1)))
            row[f"{name}_ms"] = 1e3 * _time(step, (x, w), repeats)
        row["speedup"] = row["native_ms"] / row["patch_ms"]
        row["relative_difference"] = float(
            np.max(np.abs(outputs["native"] - outputs["patch"])) / np.max(np.abs(outputs["native"]))
        )
        rows.append(row)
    return rows
