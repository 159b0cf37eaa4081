"""Self-supervised methods as plug-ins of one trainer: `methods.get(config.method)`.

Importing this package registers the built-in methods. A method defined elsewhere registers
itself with `@detcon.methods.register` on its class; the trainer needs no edit.
"""

# Built-in methods register themselves on import.
from detcon.methods import (
    byol,  # noqa: F401
    densecl,  # noqa: F401
    detco,  # noqa: F401
    detcon_b,  # noqa: F401
    detcon_s,  # noqa: F401
    detreg,  # noqa: F401
    moco,  # noqa: F401
    simclr,  # noqa: F401
)
from detcon.methods.base import DataNeeds, Forward, HeadSizes, Method, ProbeOutputs, forward_views
from detcon.methods.registry import get, names, register

__all__ = [
    "DataNeeds",
    "Forward",
    "HeadSizes",
    "Method",
    "ProbeOutputs",
    "forward_views",
    "get",
    "names",
    "register",
]
