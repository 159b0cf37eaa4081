r"""Benchmarks the DetCon-B update step, the grid-mask op, the input pipeline and FH mask writing.

  python scripts/benchmark.py --what=step --depth=50 --image_size=224 \
      --per_device_batch=64,128,256 --precision=float32,bfloat16 --steps=20 --json=step.json
  python scripts/benchmark.py --what=masks --mask_batch=64 --json=masks.json
  python scripts/benchmark.py --what=pipeline,fh --num_parallel_calls=1,2 --fh_workers=1,2

Prints one table per part and writes everything (plus the machine) to --json. Every part runs on
whatever devices are present:
  step      images/s (global and per device), step time, trace/lower and compile time, XLA memory
            and model FLOP utilisation of the pmapped update step, on synthetic data placed on the
            devices once (no TensorFlow is imported for it).
  masks     time and XLA peak memory of detcon.masks.binary_masks against the dense per-pixel
            one-hot reference binary_masks_dense, on the same id maps (outputs checked equal).
  pipeline  two-view pairs/s of detcon.data.pipeline.pretrain_batches at each --num_parallel_calls
            (TensorFlow, imported only here).
  fh        images/s per worker process of the mask writer (decode, FH, JPEG, serialise through
            detcon.data.mask_job's worker pool) against bare skimage felzenszwalb on the same
            images.
Without --dataset_directory the pipeline reads a small set written under --work_directory with the
project's record writer: ImageNet-sized photos (--photo_side) or the demo set (--pipeline_data).
"""
import argparse
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from detcon import devices as devices_lib  # noqa: E402
from detcon import experiment as experiment_lib  # noqa: E402
from detcon import methods as methods_lib  # noqa: E402
from detcon import masks as masks_lib  # noqa: E402
from detcon import model as model_lib  # noqa: E402
from detcon import networks  # noqa: E402
from detcon import step as step_lib  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("step", "masks", "pipeline", "fh")
# The schedules depend on the run length; any value works for timing.
TOTAL_STEPS = 1000
# ResNet-50 forward at 224 px: the published 4.1 GMACs (the MFU convention used throughout).
RESNET50_FORWARD_FLOPS_224 = 2 * 4.1e9
# Dense bf16 tensor-core peaks in TFLOP/s by device kind (vendor datasheets, SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L4": 121.0,
                    "TPU v4": 275.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0}


# --------------------------------------------------------------------------------------- machine

def machine_info() -> dict[str, Any]:
    """What ran the benchmark: devices, JAX version, host CPUs."""
    devices = jax.local_devices()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle
                     if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return dict(platform=devices[0].platform, device_kind=devices[0].device_kind,
                local_devices=len(devices), process_count=jax.process_count(),
                jax=jax.__version__, host_cpus=os.cpu_count(), cpu=cpu,
                python=platform.python_version(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                compilation_cache=bool(getattr(jax.config, "jax_enable_compilation_cache", False)
                                       and getattr(jax.config, "jax_compilation_cache_dir", None)))


def peak_flops(device_kind: str, override_tflops: Optional[float]) -> Optional[float]:
    """Peak FLOP/s per device used for MFU: the override, else the bf16 dense peak of the kind."""
    if override_tflops:
        return override_tflops * 1e12
    for kind, tflops in PEAK_BF16_TFLOPS.items():
        if kind.lower() in device_kind.lower():
            return tflops * 1e12
    return None  # CPUs: no meaningful tensor-core peak


# ------------------------------------------------------------------------------------------ step

def load_config(name: str = "detcon_b") -> ml_collections.ConfigDict:
    """get_config() of configs/<name>.py (a module name or a path to the file)."""
    name = os.path.splitext(os.path.basename(name))[0]
    return importlib.import_module(f"configs.{name}").get_config()


def step_config(depth: int, image_size: int, global_batch: int, precision: str,
                base: Optional[ml_collections.ConfigDict] = None) -> ml_collections.ConfigDict:
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


def synthetic_batch(image_size: int, local_devices: int, per_device_batch: int,
                    num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random views [D, b, S, S, 3] in [0, 1], blocky FH id maps [D, b, S, S], labels, indices."""
    rng = np.random.default_rng(seed)
    lead = (local_devices, per_device_batch)
    # 16-pixel blocks of ~24 ids: several objects per 32-pixel grid cell, as FH maps have.
    block = 16 if image_size % 16 == 0 else 1
    coarse = rng.integers(0, 24, lead + (image_size // block,) * 2, dtype=np.int32)
    ids = coarse.repeat(block, axis=-2).repeat(block, axis=-1)
    index = np.arange(local_devices * per_device_batch, dtype=np.int32).reshape(lead)
    return dict(view1=rng.random(lead + (image_size, image_size, 3), dtype=np.float32),
                view2=rng.random(lead + (image_size, image_size, 3), dtype=np.float32),
                fh_mask1=ids, fh_mask2=np.ascontiguousarray(ids[..., ::-1]),
                folded_segments=np.zeros(lead, np.int32),  # 24 ids per view: none folded
                label=rng.integers(0, num_classes, lead, dtype=np.int32), index=index)


def _build_step(config: ml_collections.ConfigDict, devices: Optional[Sequence[jax.Device]] = None
                ) -> tuple[Callable, Callable[[], Any], Callable]:
    """(pmapped update step, function returning the initial TrainState, per-device step)."""
    experiment = experiment_lib.build(config, TOTAL_STEPS)

    def init() -> Any:
        return experiment.init_state(jax.random.PRNGKey(0))

    return (step_lib.pmap_update_step(experiment.update_step, devices=devices), init,
            experiment.update_step)


def lower_step(config: ml_collections.ConfigDict, per_device_batch: int) -> Any:
    """The pmapped update step lowered for [local devices, per_device_batch] inputs (no compile)."""
    p_step, init, _ = _build_step(config)
    devices = jax.local_devices()
    state = jax.eval_shape(init)
    abstract_state = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct((len(devices),) + x.shape, x.dtype), state)
    batch = synthetic_batch(config.data.image_size, len(devices), per_device_batch,
                            config.model.num_classes)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    return p_step.lower(abstract_state, abstract_batch)


_OP_PATTERN = re.compile(r"\b(?:stablehlo|mhlo|chlo|func|sdy)\.[a-z_]+")


def stablehlo_op_count(lowered: Any) -> int:
    """Number of StableHLO/MHLO/func operations in a lowered computation's text."""
    return len(_OP_PATTERN.findall(lowered.as_text()))


def matmul_flops(jaxpr: Any) -> float:
    """FLOPs (2 per multiply-add) of every convolution and dot in a jaxpr, sub-jaxprs included."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            kernel, out = eqn.invars[1].aval, eqn.outvars[0].aval
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *window)
            # The kernel's input-feature dimension is already divided by the feature groups.
            per_output = kernel.shape[spec[1]] * math.prod(kernel.shape[d] for d in spec[2:])
            # An input gradient of a strided conv dilates its input: only 1/stride^2 of the
            # taps meet data; the rest multiply inserted zeros, which cuDNN never computes.
            per_output /= math.prod(eqn.params.get("lhs_dilation") or (1,))
            total += 2.0 * out.size * per_output
        elif name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += 2.0 * eqn.outvars[0].aval.size * math.prod(lhs.shape[d] for d in contracting)
        # pjit, custom_jvp/vjp, remat, cond and scan carry their bodies as (closed) jaxprs.
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns"):
                    total += matmul_flops(sub)
                elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    total += matmul_flops(sub.jaxpr)
    return total


def forward_flops(depth: int, image_size: int) -> dict[str, float]:
    """Torso forward FLOPs per image: counted from its jaxpr, and the one MFU uses (R50: 8.2e9)."""
    torso = networks.torso_fn(depth)
    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    params, net_state = jax.eval_shape(
        lambda x: torso.init(jax.random.PRNGKey(0), x, is_training=True), image)
    jaxpr = jax.make_jaxpr(lambda p, s, x: torso.apply(p, s, None, x, is_training=True)[0])(
        params, net_state, image)
    counted = matmul_flops(jaxpr.jaxpr)
    # The published anchor for ResNet-50 (4.1 GMACs at 224 px, scaling with the pixel count); the
    # count above gives 4.09 GMACs there.
    model = RESNET50_FORWARD_FLOPS_224 * (image_size / 224) ** 2 if depth == 50 else counted
    return dict(counted_forward_flops=counted, model_forward_flops=model)


def _is_out_of_memory(error: Exception) -> bool:
    """Whether an XLA error is an allocation failure (the batch does not fit)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _memory_stats(compiled: Any) -> dict[str, float]:
    """XLA's per-device buffer sizes of a compiled computation, in GiB."""
    gib = 2.0 ** 30
    try:
        stats = compiled.memory_analysis()
        stats = stats[0] if isinstance(stats, (list, tuple)) else stats
        return dict(argument_gib=stats.argument_size_in_bytes / gib,
                    output_gib=stats.output_size_in_bytes / gib,
                    alias_gib=stats.alias_size_in_bytes / gib,
                    temp_gib=stats.temp_size_in_bytes / gib)
    except Exception:  # noqa: BLE001 - some backends report nothing; the row stays useful
        return {}


def _device_peak_gib() -> Optional[float]:
    """Allocator peak of the first local device so far (GPU/TPU), in GiB; None on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2.0 ** 30


def benchmark_step(depth: int, image_size: int, per_device_batch: int, precision: str, *,
                   steps: int, warmup: int, peak: Optional[float], num_devices: int = 0,
                   base_config: Optional[ml_collections.ConfigDict] = None,
                   flops: Optional[dict[str, float]] = None,
                   compiler_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Times the pmapped update step on synthetic on-device data; one table row."""
    devices = jax.local_devices()[:num_devices or None]
    global_batch = per_device_batch * len(devices)
    row: dict[str, Any] = dict(depth=depth, image_size=image_size, precision=precision,
                               per_device_batch=per_device_batch, global_batch=global_batch,
                               devices=len(devices), steps=steps,
                               compiler_options=dict(compiler_options or {}))
    config = step_config(depth, image_size, global_batch, precision, base_config)
    flops = flops or forward_flops(depth, image_size)
    row.update(flops)
    method = methods_lib.get(config.method)(config, TOTAL_STEPS)
    row["method"] = config.method
    row["model_flops_per_image"] = method.flops_per_image(flops["model_forward_flops"])
    try:
        p_step, init, update = _build_step(config, devices)
        state = devices_lib.replicate(init(), devices)
        batch = devices_lib.shard(synthetic_batch(image_size, len(devices), per_device_batch,
                                                  config.model.num_classes), devices)
        start = time.perf_counter()
        lowered = p_step.lower(state, batch)
        lowered_at = time.perf_counter()
        compiled = lowered.compile(compiler_options=compiler_options or None)
        row["lower_s"] = lowered_at - start
        row["compile_s"] = time.perf_counter() - lowered_at
        row.update(_memory_stats(compiled))
        # Everything the step multiplies (both networks, heads, blur, backward), per image.
        per_device = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                            (state, batch))
        step_jaxpr = jax.make_jaxpr(update, axis_env=[(step_lib.AXIS, len(devices))])(*per_device)
        row["step_flops_per_image"] = matmul_flops(step_jaxpr.jaxpr) / per_device_batch
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
        row.update(status="ok", loss=loss, step_ms=1e3 * elapsed / steps,
                   step_ms_median=1e3 * float(np.median(deltas)),
                   images_per_s=steps * global_batch / elapsed)
        row["images_per_s_per_device"] = row["images_per_s"] / len(devices)
        row["device_peak_gib"] = _device_peak_gib()
        achieved = row["images_per_s_per_device"] * row["model_flops_per_image"]
        row["model_tflops_per_device"] = achieved / 1e12
        row["peak_tflops"] = None if peak is None else peak / 1e12
        row["mfu"] = None if peak is None else achieved / peak
        # The same against everything the step multiplies (heads, blur and all backward passes).
        row["mfu_counted"] = None if peak is None else (
            row["images_per_s_per_device"] * row["step_flops_per_image"] / peak)
    except Exception as error:  # noqa: BLE001 - an OOM row is a result, not a crash
        if not _is_out_of_memory(error):
            raise
        row.update(status="out of memory", error=str(error).splitlines()[0][:300])
    finally:
        state = batch = None
        gc.collect()
    return row


# ----------------------------------------------------------------------------------------- masks

def synthetic_id_maps(batch: int, image_size: int, num_ids: int = 40, seed: int = 0) -> np.ndarray:
    """Blocky int32 id maps [B, S, S] with ids in [-1, num_ids) (-1: padding, ignored)."""
    rng = np.random.default_rng(seed)
    block = 8 if image_size % 8 == 0 else 1
    coarse = rng.integers(-1, num_ids, (batch, image_size // block, image_size // block),
                          dtype=np.int32)
    return coarse.repeat(block, axis=1).repeat(block, axis=2)


def benchmark_masks(batch: int, image_size: int, max_mask_id: int, repeats: int
                    ) -> list[dict[str, Any]]:
    """binary_masks against binary_masks_dense on the same [B, S, S] ids: time, memory, equality."""
    grid = model_lib.grid_shape(image_size)
    ids = jax.device_put(synthetic_id_maps(batch, image_size))
    rows, outputs = [], {}
    for name, fn in (("binary_masks", masks_lib.binary_masks),
                     ("binary_masks_dense", masks_lib.binary_masks_dense)):
        jitted = jax.jit(lambda x, fn=fn: fn(x, grid, max_mask_id))
        start = time.perf_counter()
        compiled = jitted.lower(ids).compile()
        compile_s = time.perf_counter() - start
        memory = _memory_stats(compiled)
        row = dict(op=name, batch=batch, image_size=image_size, max_mask_id=max_mask_id,
                   compile_s=compile_s, temp_mib=memory.get("temp_gib", 0.0) * 1024,
                   output_mib=memory.get("output_gib", 0.0) * 1024)
        row["peak_mib"] = row["temp_mib"] + row["output_mib"]
        try:
            outputs[name] = np.asarray(compiled(ids))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                compiled(ids).block_until_ready()
                times.append(time.perf_counter() - start)
            row.update(status="ok", ms=1e3 * statistics.median(times),
                       images_per_s=batch / statistics.median(times))
        except Exception as error:  # noqa: BLE001 - the dense form may not fit; that is the point
            if not _is_out_of_memory(error):
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


# ---------------------------------------------------------------------------- input pipeline, FH

def photo_jpegs(long_side: int) -> list[tuple[str, bytes]]:
    """(name, JPEG bytes) of scikit-image's bundled photos resized to `long_side` (and mirrored)."""
    import skimage.data  # noqa: PLC0415 - only the data parts need it
    from PIL import Image  # noqa: PLC0415

    from detcon.data import demo, image_codec  # noqa: PLC0415 - TensorFlow lives in detcon.data

    out = []
    for name in demo.PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)())
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=-1)
        image = Image.fromarray(pixels[..., :3].astype(np.uint8))
        scale = long_side / max(image.size)
        image = image.resize((max(1, round(image.size[0] * scale)),
                              max(1, round(image.size[1] * scale))), Image.BILINEAR)
        pixels = np.asarray(image)
        out.append((f"{name}.jpg", image_codec.encode_jpeg(pixels)))
        mirror = np.ascontiguousarray(pixels[:, ::-1])
        out.append((f"{name}_mirror.jpg", image_codec.encode_jpeg(mirror)))
    return out


def photo_dataset(directory: str, long_side: int, scales: Sequence[float],
                  min_sizes: Sequence[int]) -> str:
    """A one-shard train split of the resized photos, written with the project's record writer."""
    from detcon.data import fh_records, shards  # noqa: PLC0415

    path = os.path.join(directory, shards.shard_name("train", 0, 1))
    if not os.path.exists(path):
        os.makedirs(directory, exist_ok=True)
        with fh_records.atomic_shard(path) as writer:
            for label, (name, jpeg) in enumerate(photo_jpegs(long_side), start=1):
                writer.write(fh_records.encode_record(
                    jpeg, filename=name, label=label, synset=name, text=None, scales=scales,
                    min_sizes=min_sizes))
    return directory


def benchmark_pipeline(directory: str, image_size: int, per_device_batch: int,
                       parallel_calls: Iterable[Optional[int]], batches: int, warmup: int,
                       dataset: str) -> list[dict[str, Any]]:
    """Two-view pairs/s of pretrain_batches at each num_parallel_calls (None: AUTOTUNE)."""
    from detcon.data import pipeline  # noqa: PLC0415 - TensorFlow only for this part

    rows = []
    for parallel in parallel_calls:
        iterator = pipeline.pretrain_batches(
            directory, image_size=image_size, local_devices=1, per_device_batch=per_device_batch,
            deterministic=False, num_parallel_calls=parallel, shuffle_buffer=256)
        for _ in range(warmup):
            batch = next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(iterator)
        elapsed = time.perf_counter() - start
        assert batch["view1"].shape == (1, per_device_batch, image_size, image_size, 3)
        cores = parallel or os.cpu_count()
        pairs = batches * per_device_batch / elapsed
        rows.append(dict(dataset=dataset, image_size=image_size, batch=per_device_batch,
                         num_parallel_calls=parallel if parallel else "autotune",
                         host_cpus=os.cpu_count(), pairs_per_s=pairs,
                         pairs_per_s_per_core=pairs / min(cores, os.cpu_count())))
        del iterator
    return rows


def benchmark_fh(jpegs: Sequence[tuple[str, bytes]], scales: Sequence[float],
                 min_sizes: Sequence[int], workers: Iterable[int], rounds: int, work_directory: str
                 ) -> list[dict[str, Any]]:
    """Images/s of bare skimage felzenszwalb vs the mask writer (mask_job workers) per process."""
    from skimage.segmentation import felzenszwalb  # noqa: PLC0415

    from detcon.data import image_codec, image_folder, mask_job  # noqa: PLC0415

    pixels = [image_codec.to_rgb_jpeg(jpeg)[1] for _, jpeg in jpegs]
    megapixels = float(np.mean([p.shape[0] * p.shape[1] for p in pixels])) / 1e6
    felzenszwalb(pixels[0], scale=scales[0], min_size=min_sizes[0])  # first-call overheads
    start = time.perf_counter()
    for _ in range(rounds):
        for image in pixels:
            for scale, min_size in zip(scales, min_sizes):
                felzenszwalb(image, scale=scale, min_size=min_size)
    bare = rounds * len(pixels) / (time.perf_counter() - start)
    common = dict(images=len(pixels), mean_megapixels=megapixels, fh_scales=list(scales),
                  fh_min_sizes=list(min_sizes))
    rows = [dict(method="skimage felzenszwalb (bare)", workers=1, images_per_s=bare,
                 images_per_s_per_worker=bare, relative_to_bare=1.0, **common)]

    folder = os.path.join(work_directory, "fh_images")
    os.makedirs(folder, exist_ok=True)
    files = []
    for name, jpeg in jpegs:
        path = os.path.join(folder, name)
        with open(path, "wb") as handle:
            handle.write(jpeg)
        files.append(image_folder.ImageFile(path, name, 0, "", None))
    params = mask_job.FhParams(tuple(scales), tuple(min_sizes))
    for num_workers in workers:
        work = files * max(rounds, 2 * num_workers)
        stamps = []
        start = time.perf_counter()
        for record, reason in mask_job.ordered_results(work, params, num_workers):
            if record is None:
                raise RuntimeError(f"the mask writer skipped an image: {reason}")
            stamps.append(time.perf_counter())
        # Rate once every worker has delivered: the pool's start-up is paid once per run, not
        # per image, so it is reported apart.
        warm = min(num_workers, len(stamps) - 1)
        rate = (len(stamps) - 1 - warm) / (stamps[-1] - stamps[warm]) if warm else (
            len(stamps) / (stamps[-1] - start))
        rows.append(dict(method="detcon mask writer (mask_job)", workers=num_workers,
                         images_per_s=rate, images_per_s_per_worker=rate / num_workers,
                         relative_to_bare=rate / num_workers / bare,
                         startup_s=stamps[warm] - start if warm else 0.0, **common))
    return rows


# ----------------------------------------------------------------------------------------- output

def format_table(title: str, rows: Sequence[dict[str, Any]],
                 columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table: columns are (key, header, format spec)."""
    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        if isinstance(value, str) or not spec:
            return str(value)
        return format(value, spec)

    header = [h for _, h, _ in columns]
    body = [[cell(r, k, s) for k, _, s in columns] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in body]
    return "\n".join(lines)


STEP_COLUMNS = (("method", "method", ""), ("depth", "depth", "d"), ("image_size", "px", "d"), ("precision", "precision", ""),
                ("per_device_batch", "batch/dev", "d"), ("devices", "devs", "d"),
                ("status", "status", ""), ("images_per_s", "img/s", ".1f"),
                ("images_per_s_per_device", "img/s/dev", ".1f"), ("step_ms", "ms/step", ".1f"),
                ("lower_s", "lower s", ".1f"), ("compile_s", "compile s", ".1f"),
                ("temp_gib", "temp GiB", ".2f"), ("model_tflops_per_device", "TFLOP/s", ".1f"),
                ("mfu", "MFU", ".1%"))
MASK_COLUMNS = (("op", "op", ""), ("batch", "batch", "d"), ("image_size", "px", "d"),
                ("max_mask_id", "M", "d"), ("ms", "ms", ".2f"), ("images_per_s", "img/s", ".0f"),
                ("peak_mib", "temp+out MiB", ".1f"), ("compile_s", "compile s", ".2f"),
                ("outputs_equal", "equal", ""))
PIPELINE_COLUMNS = (("dataset", "dataset", ""), ("image_size", "px", "d"), ("batch", "batch", "d"),
                    ("num_parallel_calls", "parallel calls", ""), ("host_cpus", "host cpus", "d"),
                    ("pairs_per_s", "pairs/s", ".1f"),
                    ("pairs_per_s_per_core", "pairs/s/core", ".1f"))
FH_COLUMNS = (("method", "method", ""), ("workers", "workers", "d"),
              ("mean_megapixels", "MPix", ".2f"), ("images_per_s", "img/s", ".2f"),
              ("images_per_s_per_worker", "img/s/worker", ".2f"),
              ("relative_to_bare", "vs bare", ".2f"), ("startup_s", "start-up s", ".1f"))


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _option_value(text: str) -> Any:
    """A compiler option's value: bool, int or float when it reads as one, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parallel_list(text: str) -> list[Optional[int]]:
    return [None if x in ("autotune", "0") else int(x) for x in text.split(",") if x]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line; lists are comma-separated."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--what", default="step,masks", help=f"comma-separated parts: {','.join(PARTS)}")
    add("--config", default="detcon_b",
        help="configs/<name>.py (or several, comma-separated) giving the method, heads and loss; "
             "depth, size, batch, precision override")
    add("--set", action="append", default=[], metavar="GROUP.FIELD=VALUE",
        help="config override, repeatable (e.g. model.one_pass_views=false)")
    add("--depth", type=int, default=50)
    add("--image_size", type=int, default=224)
    add("--per_device_batch", default="64", help="comma-separated list, e.g. 64,128,256")
    add("--devices", type=int, default=0, help="use the first N local devices (0: all)")
    add("--precision", default="float32", help="float32, bfloat16 or both comma-separated")
    add("--steps", type=int, default=20, help="timed steps per row")
    add("--warmup", type=int, default=2, help="untimed steps after compiling")
    add("--skip_after_oom", action=argparse.BooleanOptionalAction, default=True,
        help="skip per-device batches at least as large as one that ran out of memory")
    add("--compiler_option", action="append", default=[], metavar="KEY=VALUE",
        help="XLA option for compiling the step, repeatable (e.g. xla_gpu_autotune_level=4)")
    add("--peak_tflops", type=float, default=None,
        help="peak FLOP/s per device for MFU (default: dense bf16 peak of the device kind)")
    add("--mask_batch", type=int, default=64)
    add("--mask_image_size", type=int, default=None, help="default: --image_size")
    add("--max_mask_id", type=int, default=256)
    add("--mask_repeats", type=int, default=10)
    add("--dataset_directory", default="", help="TFRecords to read; default: built, see below")
    add("--pipeline_data", choices=("photos", "demo"), default="photos",
        help="without --dataset_directory: resized photos (--photo_side) or the demo set")
    add("--photo_side", type=int, default=500, help="long side of the photos (ImageNet ~500)")
    add("--pipeline_batch", type=int, default=32)
    add("--pipeline_batches", type=int, default=20)
    add("--pipeline_warmup", type=int, default=3)
    add("--num_parallel_calls", default="autotune", help="e.g. 1,2,autotune")
    add("--fh_scales", default="1000")
    add("--fh_min_sizes", default="1000")
    add("--fh_workers", default="1", help="worker processes, e.g. 1,2")
    add("--fh_rounds", type=int, default=2, help="passes over the 12 photos")
    add("--work_directory", default=os.path.join(tempfile.gettempdir(), "detcon_benchmark"))
    add("--json", default="", help="write all rows and the machine here")
    args = parser.parse_args(argv)
    args.parts = [p for p in args.what.split(",") if p]
    try:
        args.compiler_options = {k: _option_value(v) for k, v in
                                 (o.split("=", 1) for o in args.compiler_option)}
    except ValueError:
        parser.error(f"--compiler_option takes KEY=VALUE, got {args.compiler_option}")
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--what: unknown parts {unknown}; choose from {list(PARTS)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Runs the requested parts, prints their tables and returns (and writes) the results."""
    args = parse_args(argv)
    results: dict[str, Any] = dict(machine=machine_info(), args=vars(args))
    print(json.dumps(results["machine"]), flush=True)

    def save() -> None:
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(results, handle, indent=1, default=str)

    if "step" in args.parts:
        peak = peak_flops(results["machine"]["device_kind"], args.peak_tflops)
        flops = forward_flops(args.depth, args.image_size)
        results["step"] = []
        for name in args.config.split(","):
            base = load_config(name)
            for override in args.set:
                apply_override(base, override)
            _benchmark_steps(args, name, base, peak, flops, results, save)
        print(format_table("update step", results["step"], STEP_COLUMNS), flush=True)
    _host_parts(args, results, save)
    return results


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Sets config field 'group.field=value' (value parsed as a Python literal, else a string)."""
    path, _, text = override.partition("=")
    *groups, field = path.split(".")
    node = config
    for group in groups:
        node = node[group]
    value = _option_value(text)
    if isinstance(node[field], bool) and isinstance(value, str):
        value = value.lower() in ("1", "true", "yes")
    node[field] = value


def _benchmark_steps(args: argparse.Namespace, name: str, base: ml_collections.ConfigDict,
                     peak: Optional[float], flops: dict, results: dict, save: Callable) -> None:
    """Appends one step row per precision and per-device batch of config `name` to results."""
    for precision in args.precision.split(","):
        too_large = None  # smallest per-device batch of this precision that did not fit
        for batch in _int_list(args.per_device_batch):  # in the order given
            if too_large is not None and batch >= too_large and args.skip_after_oom:
                continue
            row = benchmark_step(args.depth, args.image_size, batch, precision,
                                 steps=args.steps, warmup=args.warmup, peak=peak,
                                 num_devices=args.devices, base_config=base, flops=flops,
                                 compiler_options=args.compiler_options)
            row = dict(config=name, overrides=list(args.set), **row)
            results["step"].append(row)
            print(json.dumps(row, default=str), flush=True)
            save()
            if row["status"] != "ok":
                too_large = min(batch, too_large or batch)


def _host_parts(args: argparse.Namespace, results: dict, save: Callable) -> None:
    """The masks, pipeline and fh parts, as requested."""
    if "masks" in args.parts:
        results["masks"] = benchmark_masks(args.mask_batch, args.mask_image_size or args.image_size,
                                           args.max_mask_id, args.mask_repeats)
        save()
        print(format_table("grid masks", results["masks"], MASK_COLUMNS), flush=True)
    scales = [float(x) for x in args.fh_scales.split(",")]
    min_sizes = _int_list(args.fh_min_sizes)
    if "pipeline" in args.parts:
        directory, dataset = args.dataset_directory, args.dataset_directory
        if not directory and args.pipeline_data == "demo":
            from detcon.data import demo  # noqa: PLC0415
            directory = demo.ensure_demo_dataset(os.path.join(args.work_directory, "demo_fh"))
            dataset = "demo (<=192 px)"
        elif not directory:
            directory = photo_dataset(
                os.path.join(args.work_directory, f"photos_{args.photo_side}_fh"),
                args.photo_side, scales, min_sizes)
            dataset = f"photos ({args.photo_side} px)"
        results["pipeline"] = benchmark_pipeline(
            directory, args.image_size, args.pipeline_batch,
            _parallel_list(args.num_parallel_calls), args.pipeline_batches,
            args.pipeline_warmup, dataset)
        save()
        print(format_table("input pipeline", results["pipeline"], PIPELINE_COLUMNS), flush=True)
    if "fh" in args.parts:
        results["fh"] = benchmark_fh(photo_jpegs(args.photo_side), scales, min_sizes,
                                     _int_list(args.fh_workers), args.fh_rounds,
                                     args.work_directory)
        save()
        print(format_table("FH masks", results["fh"], FH_COLUMNS), flush=True)


if __name__ == "__main__":
    # A persistent-cache hit would report a cache read as the compile time. (Only here: main()
    # called in-process, e.g. by the tests, leaves the caller's cache settings alone.)
    jax.config.update("jax_enable_compilation_cache", False)
    main()
