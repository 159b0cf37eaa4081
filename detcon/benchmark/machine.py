"""What ran a benchmark, and what XLA and the device allocator say about its memory."""

import os
import platform
from typing import Any, Optional

import jax


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: devices, JAX version, host CPUs."""
    devices = jax.local_devices()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [
                line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return dict(
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        local_devices=len(devices),
        process_count=jax.process_count(),
        jax=jax.__version__,
        host_cpus=os.cpu_count(),
        cpu=cpu,
        python=platform.python_version(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        compilation_cache=bool(
            getattr(jax.config, "jax_enable_compilation_cache", False)
            and getattr(jax.config, "jax_compilation_cache_dir", None)
        ),
    )


def is_out_of_memory(error: Exception) -> bool:
    """Whether an XLA error is an allocation failure (the batch does not fit)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def memory_stats(compiled: Any) -> dict[str, float]:
    """XLA's per-device buffer sizes of a compiled computation, in GiB."""
    gib = 2.0**30
    try:
        stats = compiled.memory_analysis()
        stats = stats[0] if isinstance(stats, (list, tuple)) else stats
        return dict(
            argument_gib=stats.argument_size_in_bytes / gib,
            output_gib=stats.output_size_in_bytes / gib,
            alias_gib=stats.alias_size_in_bytes / gib,
            temp_gib=stats.temp_size_in_bytes / gib,
        )
    except Exception:
        return {}


def device_peak_gib() -> Optional[float]:
    """Allocator peak of the first local device so far (GPU/TPU), in GiB; None on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2.0**30
