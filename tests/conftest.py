"""Test setup: 8 fake CPU devices for multi-device tests, set before JAX is imported."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Subprocess runs of the same program (resume, multi-process) reuse compilations.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.environ.get("TMPDIR", "/tmp"), f"detcon_test_jax_cache_{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import importlib  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


# Methods defined outside the package join the registry-wide tests (the method contract) when
# their modules are named here, comma-separated; each module also defines get_config().
EXTRA_METHOD_MODULES = [m for m in os.environ.get("DETCON_EXTRA_METHODS", "").split(",") if m]
for _module in EXTRA_METHOD_MODULES:
    importlib.import_module(_module)


def load_config(name: str):
    """get_config() of configs.<name>, else of the module that registered method `name`."""
    try:
        return importlib.import_module(f"configs.{name}").get_config()
    except ModuleNotFoundError as error:
        if error.name != f"configs.{name}":
            raise
    from detcon import methods  # after the device flags above

    return sys.modules[methods.get(name).__module__].get_config()


def logged(workdir: str, key: str) -> list:
    """The values of `key` in every line of <workdir>/metrics.jsonl, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


def shrink_heads(c) -> None:
    """Cuts the method's head sizes, sampled masks, queues and patches of config `c` to CPU-test
    sizes (queues of 64 hold whole batches of 8, 16, 32 or 64)."""
    from detcon import methods

    sizes = methods.HeadSizes(
        hidden=lambda width: 64, output=32, num_samples=4, queue_size=64, patch_size=32
    )
    methods.get(c.method).resize(c[c.method], sizes)
    # Transformer methods (DETReg) keep two encoder and two decoder layers (an auxiliary layer
    # is still checked), so their steps compile in a CPU test's time.
    for field in ("num_encoder_layers", "num_decoder_layers"):
        if field in c[c.method]:
            c[c.method][field] = min(c[c.method][field], 2)


def tiny_config(batch_size: int = 8, image_size: int = 64, method: str = "demo"):
    """A method's config shrunk for CPU tests: ResNet-10, 64 px, small heads, mock data.

    method "demo" is the DetCon-B demo config; otherwise the name of a module in configs/.
    """
    c = load_config(method)
    shrink_heads(c)
    c.model.num_classes = 4
    c.data.image_size = image_size
    c.data.num_train_examples = 1000
    c.model.depth = 10
    c.training.batch_size = batch_size
    c.training.mock_data = True
    c.training.log_every_steps = 1
    return c


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture(autouse=True)
def _release_compiled_programs(request):
    """Drops JAX's compiled programs after each test: on CPU every training run's programs hold
    ~1,900 memory maps, and one pytest process that kept a module's worth of runs met Linux's
    limit of 65,530 maps (vm.max_map_count), where XLA's next compilation segfaulted.

    Modules marked keeps_compiled_programs share one compiled step across tests (and count its
    traces), so theirs are dropped when the module ends instead."""
    yield
    if request.node.get_closest_marker("keeps_compiled_programs") is None:
        from detcon.train import compilation_cache

        compilation_cache.release_compiled_programs()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs_of_module():
    yield
    from detcon.train import compilation_cache

    compilation_cache.release_compiled_programs()


@pytest.fixture(autouse=True)
def _restore_absl_verbosity():
    """Puts absl's logger level back after each test: parsing absl flags in-process (the
    evaluate CLI tests) applies --verbosity's default, WARNING, which would hide the INFO lines a
    later test reads from the log."""
    import logging

    absl_logger = logging.getLogger("absl")
    before = absl_logger.level
    yield
    absl_logger.setLevel(before)
