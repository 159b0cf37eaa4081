"""The grid-mask op against its dense per-pixel reference: time, XLA memory, equal outputs."""

import statistics
import time
from typing import Any

import jax
import numpy as np

from detcon.benchmark import machine
from detcon.models import heads as model_lib
from detcon.ops import masks as masks_lib


def synthetic_id_maps(batch: int, image_size: int, num_ids: int = 40, seed: int = 0) -> np.ndarray:
    """Blocky int32 id maps [B, S, S] with ids in [-1, num_ids) (-1: padding, ignored)."""
    rng = np.random.default_rng(seed)
    block = 8 if image_size % 8 == 0 else 1
    coarse = rng.integers(
        -1, num_ids, (batch, image_size // block, image_size // block), dtype=np.int32
    )
    return coarse.repeat(block, axis=1).repeat(block, axis=2)


def benchmark_masks(
    batch: int, image_size: int, max_mask_id: int, repeats: int
) -> list[dict[str, Any]]:
    """binary_masks against binary_masks_dense on the same [B, S, S] ids: time, memory, equality."""
    grid = model_lib.grid_shape(image_size)
    ids = jax.device_put(synthetic_id_maps(batch, image_size))
    rows, outputs = [], {}
    for name, fn in (
        ("binary_masks", masks_lib.binary_masks),
        ("binary_masks_dense", masks_lib.binary_masks_dense),
    ):
        jitted = jax.jit(lambda x, fn=fn: fn(x, grid, max_mask_id))
        start = time.perf_counter()
        compiled = jitted.lower(ids).compile()
        compile_s = time.perf_counter() - start
        memory = machine.memory_stats(compiled)
        row = dict(
            op=name,
            batch=batch,
            image_size=image_size,
            max_mask_id=max_mask_id,
            compile_s=compile_s,
            temp_mib=memory.get("temp_gib", 0.0) * 1024,
            output_mib=memory.get("output_gib", 0.0) * 1024,
        )
        row["peak_mib"] = row["temp_mib"] + row["output_mib"]
        try:
            outputs[name] = np.asarray(compiled(ids))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                compiled(ids).block_until_ready()
                times.append(time.perf_counter() - start)
            row.update(
                status="ok",
                ms=1e3 * statistics.median(times),
                images_per_s=batch / statistics.median(times),
            )
        except Exception as error:
            if not machine.is_out_of_memory(error):
                raise
            row.update(status="out of memory", ms=None, images_per_s=None)
        rows.append(row)
    if len(outputs) == 2:
        same = bool(np.array_equal(outputs["binary_masks"], outputs["binary_masks_dense"]))
        for row in rows:
            row["outputs_equal"] = same
    fast, dense = rows
    if fast.get("ms") and dense.get("ms"):
        fast["speedup_vs_dense"] = dense["ms"] / fast["ms"]
    if fast["peak_mib"]:
        fast["memory_ratio_vs_dense"] = dense["peak_mib"] / fast["peak_mib"]
    return rows
