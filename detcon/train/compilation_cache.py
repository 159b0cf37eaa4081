"""JAX's compiled programs: the persistent cache, on by default, so a resumed run skips
recompiling, and the release of in-memory programs a long process is done with."""

import gc
import os

import jax
from absl import logging

DEFAULT_DIRECTORY = os.path.join("~", ".cache", "detcon", "jax")


def cache_directory() -> str:
    """$DETCON_CACHE_DIR, else JAX's own setting (JAX_COMPILATION_CACHE_DIR), else the default."""
    chosen = (
        os.environ.get("DETCON_CACHE_DIR")
        or jax.config.jax_compilation_cache_dir
        or DEFAULT_DIRECTORY
    )
    return os.path.abspath(os.path.expanduser(chosen))


def enable(enabled: bool = True) -> str | None:
    """Points JAX's persistent cache at cache_directory() (or turns it off); returns the path."""
    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        logging.info("Persistent compilation cache off (config.training.compilation_cache).")
        return None
    directory = cache_directory()
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:  # a read-only home must not stop training, only slow its start
        logging.warning(
            "Compilation cache disabled: cannot create %s (%s); set "
            "$DETCON_CACHE_DIR to a writable directory.",
            directory,
            error,
        )
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Cache everything that took a second to compile: the update step takes tens of seconds.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    logging.info("Persistent compilation cache: %s", directory)
    return directory


def release_compiled_programs() -> None:
    """Drops JAX's in-memory compiled programs once a run is done with them.

    On CPU one pretraining run's programs hold ~1,900 memory maps (LLVM's JIT code) until JAX's
    caches let go; a process that kept many runs' programs would meet Linux's default limit of
    65,530 maps (vm.max_map_count), where the next compilation segfaults.
    """
    jax.clear_caches()
    gc.collect()
