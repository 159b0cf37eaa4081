"""Placing host data on the local devices for pmap (jax.device_put_replicated/_sharded are gone)."""

from typing import Any, Sequence

import jax
import numpy as np

# The pmap axis name. pmap's outputs carry a mesh named after it, so inputs placed on the same
# mesh make the second call hit the compilation cache instead of recompiling.
AXIS = "i"


def _sharding(devices: Sequence[jax.Device]) -> jax.sharding.NamedSharding:
    """Splits a leading axis one slice per device over `devices`, as pmap does."""
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def shard(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """Host arrays [D_local, ...] -> one slice per local device (a global array over all hosts)."""
    if jax.process_count() > 1:
        sharding = _sharding(jax.devices())
        return jax.tree_util.tree_map(
            lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
        )
    sharding = _sharding(devices)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)


def replicate(tree: Any, devices: Sequence[jax.Device]) -> Any:
    """One copy of every leaf per local device: [...] -> [D, ...]."""
    stacked = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * len(devices)), tree)
    return shard(stacked, devices)


def unreplicate(tree: Any) -> Any:
    """The first local copy of a replicated pytree, on the host."""
    return jax.tree_util.tree_map(
        lambda x: (
            np.asarray(x.addressable_shards[0].data)[0]
            if isinstance(x, jax.Array)
            else np.asarray(x)[0]
        ),
        tree,
    )
