"""FLOP counts of the update step and the torso, and the per-device peaks MFU is measured against."""

import math
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp

from detcon.models import networks

# ResNet-50 forward at 224 px: the published 4.1 GMACs (the MFU convention used throughout).
RESNET50_FORWARD_FLOPS_224 = 2 * 4.1e9
# Dense bf16 tensor-core peaks in TFLOP/s by device kind (vendor datasheets, SXM parts).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
}


def peak_flops(device_kind: str, override_tflops: Optional[float]) -> Optional[float]:
    """Peak FLOP/s per device used for MFU: the override, else the bf16 dense peak of the kind."""
    if override_tflops:
        return override_tflops * 1e12
    for kind, tflops in PEAK_BF16_TFLOPS.items():
        if kind.lower() in device_kind.lower():
            return tflops * 1e12
    return None  # CPUs: no meaningful tensor-core peak


_OP_PATTERN = re.compile(r"\b(?:stablehlo|mhlo|chlo|func|sdy)\.[a-z_]+")


def stablehlo_op_count(lowered: Any) -> int:
    """Number of StableHLO/MHLO/func operations in a lowered computation's text."""
    return len(_OP_PATTERN.findall(lowered.as_text()))


def matmul_flops(jaxpr: Any) -> float:
    """FLOPs (2 per multiply-add) of every convolution and dot in a jaxpr, sub-jaxprs included."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            kernel, out = eqn.invars[1].aval, eqn.outvars[0].aval
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *window)
            # The kernel's input-feature dimension is already divided by the feature groups.
            per_output = kernel.shape[spec[1]] * math.prod(kernel.shape[d] for d in spec[2:])
            # An input gradient of a strided conv dilates its input: only 1/stride^2 of the
            # taps meet data; the rest multiply inserted zeros, which cuDNN never computes.
            per_output /= math.prod(eqn.params.get("lhs_dilation") or (1,))
            total += 2.0 * out.size * per_output
        elif name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += 2.0 * eqn.outvars[0].aval.size * math.prod(lhs.shape[d] for d in contracting)
        # pjit, custom_jvp/vjp, remat, cond and scan carry their bodies as (closed) jaxprs.
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns"):
                    total += matmul_flops(sub)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    total += matmul_flops(sub.jaxpr)
    return total


def forward_flops(depth: int, image_size: int) -> dict[str, float]:
    """Torso forward FLOPs per image: counted from its jaxpr, and the one MFU uses (R50: 8.2e9)."""
    torso = networks.torso_fn(depth)
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    params, net_state = jax.eval_shape(
        lambda x: torso.init(jax.random.PRNGKey(0), x, is_training=True), image
    )
    jaxpr = jax.make_jaxpr(lambda p, s, x: torso.apply(p, s, None, x, is_training=True)[0])(
        params, net_state, image
    )
    counted = matmul_flops(jaxpr.jaxpr)
    # The published anchor for ResNet-50 (4.1 GMACs at 224 px, scaling with the pixel count); the
    # count above gives 4.09 GMACs there.
    model = RESNET50_FORWARD_FLOPS_224 * (image_size / 224) ** 2 if depth == 50 else counted
    return dict(counted_forward_flops=counted, model_forward_flops=model)
