"""Times the pmapped update step of any method on synthetic batches placed on the devices once."""

import gc
import importlib
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import ml_collections
import numpy as np

from detcon import devices as devices_lib
from detcon import methods as methods_lib
from detcon.benchmark import flops as flops_lib
from detcon.benchmark import machine
from detcon.train import experiment as experiment_lib
from detcon.train import mock_data
from detcon.train import step as step_lib

# The schedules depend on the run length; any value works for timing.
TOTAL_STEPS = 1000


def load_config(name: str = "detcon_b") -> ml_collections.ConfigDict:
    """get_config() of configs/<name>.py (a module name or a path to the file)."""
    name = os.path.splitext(os.path.basename(name))[0]
    return importlib.import_module(f"configs.{name}").get_config()


def step_config(
    depth: int,
    image_size: int,
    global_batch: int,
    precision: str,
    base: Optional[ml_collections.ConfigDict] = None,
) -> ml_collections.ConfigDict:
    """The DetCon-B ImageNet recipe (or `base`) at the given depth, image size, batch, precision."""
    config = load_config() if base is None else ml_collections.ConfigDict(base.to_dict())
    config.model.depth = depth
    config.model.precision = precision
    config.data.image_size = image_size
    config.training.batch_size = global_batch
    config.training.mock_data = True
    if config.model.num_classes <= 0:  # "from the dataset": synthetic data has ImageNet's count
        config.model.num_classes = 1000
    if config.data.num_train_examples <= 0:  # likewise for the warm-up length in epochs
        config.data.num_train_examples = 1_281_167
    return config


def synthetic_batch(
    config: ml_collections.ConfigDict, local_devices: int, per_device_batch: int
) -> dict[str, np.ndarray]:
    """The trainer's mock batch [D, b, ...] at the config's image size and class count (with
    region priors for methods that need them)."""
    return mock_data.device_batch(
        0,
        0,
        local_devices,
        per_device_batch,
        config.data.image_size,
        config.model.num_classes,
        num_boxes=methods_lib.get(config.method).data_needs(config).num_regions,
    )


def build_step(
    config: ml_collections.ConfigDict, devices: Optional[Sequence[jax.Device]] = None
) -> tuple[Callable, Callable[[], Any], Callable]:
    """(pmapped update step, function returning the initial TrainState, per-device step)."""
    experiment = experiment_lib.build(config, TOTAL_STEPS)

    def init() -> Any:
        return experiment.init_state(jax.random.PRNGKey(0))

    return (
        step_lib.pmap_update_step(experiment.update_step, devices=devices),
        init,
        experiment.update_step,
    )


def lower_step(config: ml_collections.ConfigDict, per_device_batch: int) -> Any:
    """The pmapped update step lowered for [local devices, per_device_batch] inputs (no compile)."""
    p_step, init, _ = build_step(config)
    devices = jax.local_devices()
    state = jax.eval_shape(init)
    abstract_state = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((len(devices),) + x.shape, x.dtype), state
    )
    batch = synthetic_batch(config, len(devices), per_device_batch)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    return p_step.lower(abstract_state, abstract_batch)


def benchmark_step(
    depth: int,
    image_size: int,
    per_device_batch: int,
    precision: str,
    *,
    steps: int,
    warmup: int,
    peak: Optional[float],
    num_devices: int = 0,
    base_config: Optional[ml_collections.ConfigDict] = None,
    flops: Optional[dict[str, float]] = None,
    compiler_options: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Times the pmapped update step on synthetic on-device data; one table row."""
    devices = jax.local_devices()[: num_devices or None]
    global_batch = per_device_batch * len(devices)
    row: dict[str, Any] = dict(
        depth=depth,
        image_size=image_size,
        precision=precision,
        per_device_batch=per_device_batch,
        global_batch=global_batch,
        devices=len(devices),
        steps=steps,
        compiler_options=dict(compiler_options or {}),
    )
    config = step_config(depth, image_size, global_batch, precision, base_config)
    flops = flops or flops_lib.forward_flops(depth, image_size)
    row.update(flops)
    method = methods_lib.get(config.method)(config, TOTAL_STEPS)
    row["method"] = config.method
    row["model_flops_per_image"] = method.flops_per_image(flops["model_forward_flops"])
    try:
        p_step, init, update = build_step(config, devices)
        state = devices_lib.replicate(init(), devices)
        batch = devices_lib.shard(synthetic_batch(config, len(devices), per_device_batch), devices)
        start = time.perf_counter()
        lowered = p_step.lower(state, batch)
        lowered_at = time.perf_counter()
        compiled = lowered.compile(compiler_options=compiler_options or None)
        row["lower_s"] = lowered_at - start
        row["compile_s"] = time.perf_counter() - lowered_at
        row.update(machine.memory_stats(compiled))
        # Everything the step multiplies (both networks, heads, blur, backward), per image.
        per_device = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), (state, batch)
        )
        step_jaxpr = jax.make_jaxpr(update, axis_env=[(step_lib.AXIS, len(devices))])(*per_device)
        row["step_flops_per_image"] = flops_lib.matmul_flops(step_jaxpr.jaxpr) / per_device_batch
        for _ in range(warmup):
            state, metrics = compiled(state, batch)
        loss = float(np.asarray(metrics["loss"]).ravel()[0]) if warmup else float("nan")
        jax.block_until_ready(state)
        step_times = []
        start = time.perf_counter()
        for _ in range(steps):
            # Blocking each step costs one host round trip (<1 ms) and gives a median too.
            state, metrics = compiled(state, batch)
            jax.block_until_ready(state)
            step_times.append(time.perf_counter())
        elapsed = step_times[-1] - start
        deltas = np.diff([start] + step_times)
        row.update(
            status="ok",
            loss=loss,
            step_ms=1e3 * elapsed / steps,
            step_ms_median=1e3 * float(np.median(deltas)),
            images_per_s=steps * global_batch / elapsed,
        )
        row["images_per_s_per_device"] = row["images_per_s"] / len(devices)
        row["device_peak_gib"] = machine.device_peak_gib()
        achieved = row["images_per_s_per_device"] * row["model_flops_per_image"]
        row["model_tflops_per_device"] = achieved / 1e12
        row["peak_tflops"] = None if peak is None else peak / 1e12
        row["mfu"] = None if peak is None else achieved / peak
        # The same against everything the step multiplies (heads, blur and all backward passes).
        row["mfu_counted"] = (
            None
            if peak is None
            else (row["images_per_s_per_device"] * row["step_flops_per_image"] / peak)
        )
    except Exception as error:
        if not machine.is_out_of_memory(error):
            raise
        row.update(status="out of memory", error=str(error).splitlines()[0][:300])
    finally:
        state = batch = None
        gc.collect()
    return row
