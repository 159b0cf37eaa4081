"""Exact Hungarian matching of predictions to targets: scipy's linear_sum_assignment on the host
through jax.pure_callback (works under jit, pmap and grad; the result carries no gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize


def _match_on_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per image: the query assigned to each valid target, -1 for padding: [B, Q, T] -> [B, T]."""
    out = np.full(valid.shape, -1, np.int32)
    for b in range(cost.shape[0]):
        columns = np.flatnonzero(valid[b])
        if columns.size == 0:
            continue
        # Padded columns are sliced off, so they cannot change the optimum on the real ones.
        rows, cols = scipy.optimize.linear_sum_assignment(cost[b][:, columns])
        out[b, columns[cols]] = rows
    return out


def hungarian_match(cost: jax.Array, valid: jax.Array) -> jax.Array:
    """The query matched to each target: cost [B, Q, T], valid [B, T] bool -> [B, T] int32.

    Padded targets (valid False) get -1. Needs Q >= the number of valid targets per image. The
    cost is read under stop_gradient: matching is a discrete choice, as in DETR's no_grad matcher.
    """
    if cost.ndim != 3 or valid.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(
            f"cost must be [B, Q, T] and valid [B, T]; got {cost.shape}, {valid.shape}"
        )
    cost = jax.lax.stop_gradient(cost).astype(jnp.float32)
    result = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
    return jax.pure_callback(
        lambda c, v: _match_on_host(np.asarray(c), np.asarray(v)),
        result,
        cost,
        valid.astype(bool),
        vmap_method="sequential",
    )
