"""MoCo-style queues of negatives: FIFO rings of L2-normalised keys, identical on every device.

A queue is a [K, D] array plus a shared int32 write pointer, kept in TrainState.extra so it is
checkpointed and restored with the run. Keys are all-gathered over the pmap axis (which spans
every host's devices) and written in global-batch order, as MoCo's concat_all_gather does.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from detcon.ops import losses


def check_queue_size(queue_size: int, global_batch: int, field: str) -> None:
    """Raises a one-line ValueError unless the queue holds a whole number of global batches."""
    if queue_size <= 0 or queue_size % global_batch:
        raise ValueError(
            f"{field}={queue_size} must be a positive multiple of the global batch "
            f"(--batch_size={global_batch}) so that every step writes one contiguous block; "
            f"use e.g. {max(1, queue_size // global_batch) * global_batch}."
        )


def init_queue(key: jax.Array, size: int, dim: int) -> jax.Array:
    """[size, dim] random-normal rows, each L2-normalised (MoCo's initial queue)."""
    return losses.l2_normalize(jax.random.normal(key, (size, dim), jnp.float32))


def gather_keys(keys: jax.Array, axis_name: Optional[str]) -> jax.Array:
    """Per-device keys [b, ...] -> the global batch [B, ...] in global example order."""
    if axis_name is None:
        return keys
    return jax.lax.all_gather(keys, axis_name, tiled=True)


def enqueue(queue: jax.Array, pointer: jax.Array, keys: jax.Array) -> jax.Array:
    """The queue [K, D] with keys [B, D] written at rows pointer..pointer+B-1 (oldest first out).

    K is a multiple of B (check_queue_size), so a write never straddles the end of the ring.
    """
    return jax.lax.dynamic_update_slice_in_dim(queue, keys.astype(queue.dtype), pointer, axis=0)


def advance(pointer: jax.Array, num_keys: int, queue_size: int) -> jax.Array:
    """The write pointer after num_keys rows, wrapped to the start of a ring of queue_size."""
    return (pointer + num_keys) % queue_size
