"""Mixed-precision policies: bf16 compute with fp32 parameters, BatchNorm and loss.

Under "bfloat16" the torso and the projector/predictor MLPs run their convolutions and matmuls
in bf16; parameters are created, stored, differentiated and updated in fp32 (cast to bf16 only
when read inside those modules); BatchNorm computes its statistics and moving averages in fp32
and hands bf16 to the next layer; the linear probe and the loss (`detcon.ops.losses`) stay fp32.
"""

import contextlib
from typing import Iterator

import haiku as hk
import jmp

from detcon.models import networks

PRECISIONS: tuple[str, ...] = ("float32", "bfloat16")


def check_precision(precision: str) -> None:
    """Raises ValueError unless `precision` is one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"config.model.precision must be one of {list(PRECISIONS)}, got {precision!r}."
        )


def module_policies(precision: str) -> dict[type[hk.Module], jmp.Policy]:
    """The jmp policy of each module class under `precision` ('float32' or 'bfloat16')."""
    check_precision(precision)
    compute = precision
    network = jmp.get_policy(f"params=float32,compute={compute},output=float32")
    full = jmp.get_policy("params=float32,compute=float32,output=float32")
    # BatchNorm reads bf16 activations, computes mean/var and moving averages in fp32 and hands
    # the compute dtype back to the next conv. It is nested in the torso and MLPs, so its own
    # policy takes over from theirs for its parameters and state.
    batch_norm = jmp.get_policy(f"params=float32,compute=float32,output={compute}")
    return {
        networks.ResNetTorso: network,
        networks.MLP: network,
        hk.BatchNorm: batch_norm,
        networks.LinearClassifier: full,
    }


@contextlib.contextmanager
def policies(precision: str) -> Iterator[None]:
    """Applies `precision`'s module policies while the block runs (use it inside a forward).

    Haiku reads its policy table when a module is called, i.e. when the forward is traced, and
    the table is process-wide: set once at construction, a later network of another precision
    would silently change how this one traces. Pushing them for the duration of the trace makes
    each network's precision its own.
    """
    with contextlib.ExitStack() as stack:
        for cls, policy in module_policies(precision).items():
            stack.enter_context(hk.mixed_precision.push_policy(cls, policy))
        yield
