"""Placing host data on the local devices for pmap (jax.device_put_replicated/_sharded are gone)."""
from typing import Any, Sequence

import jax
import numpy as np

_AXIS = "devices"


def _sharding(devices: Sequence[jax.Device]) -> jax.sharding.NamedSharding:
    """Splits a leading axis of size len(devices) one slice per device, as pmap expects."""
    mesh = jax.sharding.Mesh(np.asarray(devices), (_AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(_AXIS))


def shard(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """Host arrays [D, ...] -> one slice per local device.

    With several processes pmap itself assembles the global array from each process's host
    arrays, so they are passed through as NumPy.
    """
    if jax.process_count() > 1:
        return jax.tree_util.tree_map(np.asarray, tree)
    sharding = _sharding(devices)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """One copy of every leaf per local device: [...] -> [D, ...]."""
    stacked = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * len(devices)), tree)
    return shard(stacked, devices)


def unreplicate(tree: Any) -> Any:
    """The first local copy of a replicated pytree, on the host."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_shards[0].data)[0]
                                  if isinstance(x, jax.Array) else np.asarray(x)[0], tree)
