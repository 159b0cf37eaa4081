"""The persistent compilation cache: on by default in $DETCON_CACHE_DIR, off by config."""

import os

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from detcon.train import compilation_cache

_KEYS = (
    "jax_enable_compilation_cache",
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
)


@pytest.fixture
def restore_jax_config():
    saved = {key: getattr(jax.config, key) for key in _KEYS}
    jax_cache.reset_cache()  # the suite's cache may be open already; a run starts fresh
    yield
    for key, value in saved.items():
        jax.config.update(key, value)
    jax_cache.reset_cache()


def test_cache_directory_precedence(monkeypatch, tmp_path, restore_jax_config):
    monkeypatch.setenv("DETCON_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation_cache.cache_directory() == str(tmp_path / "mine")
    monkeypatch.delenv("DETCON_CACHE_DIR")
    jax.config.update("jax_compilation_cache_dir", None)
    assert compilation_cache.cache_directory() == os.path.expanduser("~/.cache/detcon/jax")


def test_enabled_cache_stores_compilations_and_can_be_turned_off(
    monkeypatch, tmp_path, restore_jax_config
):
    directory = tmp_path / "cache"
    monkeypatch.setenv("DETCON_CACHE_DIR", str(directory))
    assert compilation_cache.enable(True) == str(directory)
    assert jax.config.jax_enable_compilation_cache
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.jit(lambda x: jnp.sin(x) * 3.25 + 1.5)(jnp.arange(7.0)).block_until_ready()
    assert any(directory.iterdir()), "nothing was written to the cache"
    assert compilation_cache.enable(False) is None
    assert not jax.config.jax_enable_compilation_cache
