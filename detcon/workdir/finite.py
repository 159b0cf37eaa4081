"""Finiteness of a pytree of arrays: which leaves hold NaN or inf."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def non_finite_leaves(tree: Any) -> list[str]:
    """Key paths (e.g. "online_params/res_net18/~/initial_conv/w") of floating leaves with NaN/inf."""
    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.asarray(leaf)
        if jnp.issubdtype(array.dtype, jnp.inexact) and not np.isfinite(array).all():
            bad.append("/".join(_key_name(k) for k in path))
    return bad


def _key_name(key: Any) -> str:
    """The readable name of one pytree path entry (dict key, attribute or index)."""
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def describe(bad: list[str], limit: int = 3) -> str:
    """'a, b, c and 5 more' for a list of leaf paths."""
    shown = ", ".join(bad[:limit])
    return shown + (f" and {len(bad) - limit} more" if len(bad) > limit else "")
