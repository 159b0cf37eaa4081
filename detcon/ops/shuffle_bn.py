"""MoCo's shuffle BN: the key encoder sees a random permutation of the global batch, so each
device's BatchNorm statistics come from other images than the queries' (no information leaks
through batch statistics); its outputs are then put back in the original order."""

from typing import Any

import jax
import jax.numpy as jnp


def _take_global(x: jax.Array, order: jax.Array, axis_name: str) -> jax.Array:
    """This device's rows of the global batch reordered by `order` [B]: gathered x [B][order]."""
    everything = jax.lax.all_gather(x, axis_name, tiled=True)
    per_device = x.shape[0]
    mine = jax.lax.axis_index(axis_name) * per_device + jnp.arange(per_device)
    return everything[order[mine]]


def permutation(key: jax.Array, per_device: int, axis_name: str) -> jax.Array:
    """A permutation [B] of the global batch, the same on every device (key is step-wide)."""
    global_batch = per_device * jax.lax.axis_size(axis_name)
    return jax.random.permutation(key, global_batch)


def shuffle(tree: Any, perm: jax.Array, axis_name: str) -> Any:
    """Every leaf [b, ...] replaced by this device's slice of the shuffled global batch."""
    return jax.tree_util.tree_map(lambda x: _take_global(x, perm, axis_name), tree)


def unshuffle(tree: Any, perm: jax.Array, axis_name: str) -> Any:
    """Undoes `shuffle`: leaves [b, ...] back at their examples' original device and row."""
    inverse = jnp.argsort(perm)
    return jax.tree_util.tree_map(lambda x: _take_global(x, inverse, axis_name), tree)
