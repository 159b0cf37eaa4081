"""Test setup: 8 fake CPU devices for multi-device tests, set before JAX is imported."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Subprocess runs of the same program (resume, multi-process) reuse compilations.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"detcon_test_jax_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str):
    """get_config() of configs/<name>.py."""
    spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(batch_size: int = 8, image_size: int = 64):
    """The demo config shrunk for CPU tests: ResNet-18, 64 px, small heads, mock data."""
    c = load_config("demo")
    c.model.projector_hidden_size = 64
    c.model.projector_output_size = 32
    c.model.predictor_hidden_size = 64
    c.model.num_classes = 4
    c.data.image_size = image_size
    c.model.depth = 10
    c.loss.num_samples = 4
    c.training.batch_size = batch_size
    c.training.mock_data = True
    c.training.log_every_steps = 1
    return c


@pytest.fixture
def tiny():
    return tiny_config
