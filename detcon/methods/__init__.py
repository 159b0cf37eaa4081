"""Self-supervised methods as plug-ins of one trainer: `methods.get(config.method)`.

Importing this package registers the built-in methods. A method defined elsewhere registers
itself with `@detcon.methods.register` on its class; the trainer needs no edit.
"""
from detcon.methods.base import Forward, Method, forward_views
from detcon.methods.registry import get, names, register

# Built-in methods register themselves on import.
from detcon.methods import detcon_b  # noqa: F401,E402  pylint: disable=g-import-not-at-top
from detcon.methods import byol  # noqa: F401,E402
from detcon.methods import detcon_s  # noqa: F401,E402
from detcon.methods import simclr  # noqa: F401,E402
from detcon.methods import moco  # noqa: F401,E402
from detcon.methods import densecl  # noqa: F401,E402
from detcon.methods import detco  # noqa: F401,E402
