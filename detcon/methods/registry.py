"""The registry of methods by name; a method module registers its class on import."""

from typing import TypeVar

from detcon.methods import base

_METHODS: dict[str, type[base.Method]] = {}
M = TypeVar("M", bound=type[base.Method])


def register(method: M) -> M:
    """Class decorator: makes `method` available as methods.get(method.name)."""
    if method.name in _METHODS and _METHODS[method.name] is not method:
        raise ValueError(
            f"A method named {method.name!r} is already registered "
            f"({_METHODS[method.name].__module__})."
        )
    _METHODS[method.name] = method
    return method


def get(name: str) -> type[base.Method]:
    """The method class registered under `name`; the error lists the registered names."""
    if name not in _METHODS:
        raise ValueError(
            f"config.method={name!r} is not a registered method; available: "
            f"{', '.join(sorted(_METHODS))}."
        )
    return _METHODS[name]


def names() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_METHODS)
