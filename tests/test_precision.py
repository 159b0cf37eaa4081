"""bf16 mixed precision: bf16 convs and matmuls; fp32 parameters, optimizer, BatchNorm and loss."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detcon.models import patch_conv
from detcon.train import experiment as experiment_lib
from detcon.train import mock_data
from detcon.train import state as state_lib

from conftest import tiny_config

TOTAL_STEPS = 100
# The bf16 step's loss on a fixed batch and the same initial state lies within this relative
# distance of the fp32 loss (bf16 keeps 8 significant bits: ~0.4% per rounding; BatchNorm and
# the loss run in fp32, so the errors do not compound through the network).
LOSS_RTOL = 2e-2
# Faster CPU compilation (same arithmetic, less optimised code): the compiled step is only run
# once here.
_FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
# "%r = stablehlo.convolution(...) ... feature_group_count = G ... : (lhs, rhs) -> out".
_CONV = re.compile(
    r"stablehlo\.convolution.*feature_group_count = (\d+).*"
    r": \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>"
)
_DOT = re.compile(
    r"stablehlo\.dot_general.*"
    r": \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>"
)


def _convolutions(text: str) -> list[tuple[int, str, str, str]]:
    """(feature groups, lhs, rhs, output element type) of every convolution in StableHLO text."""
    return [(int(g), a, b, c) for g, a, b, c in _CONV.findall(text)]


def _floating_dtypes(tree) -> set:
    """The dtypes of a pytree's floating-point leaves."""
    leaves = jax.tree_util.tree_leaves(tree)
    return {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.fixture(scope="module")
def runs():
    """One update step per precision from the same initial state and batch: (state, results)."""
    configs = {}
    for precision in ("float32", "bfloat16"):
        configs[precision] = tiny_config(batch_size=4)
        configs[precision].optim.warmup_fraction = 0.0  # a non-zero first learning rate
        configs[precision].model.precision = precision
    # Both networks exist before either is traced: each must keep its own precision.
    experiments = {
        p: experiment_lib.build(c, TOTAL_STEPS, axis_name=None) for p, c in configs.items()
    }
    c = configs["float32"]

    def init(precision: str) -> state_lib.TrainState:
        return experiments[precision].init_state(jax.random.PRNGKey(0))

    state = init("float32")
    batch = mock_data.mock_batch(0, 0, np.arange(4), c.data.image_size, c.model.num_classes)
    results = {}
    for precision in configs:
        update = experiments[precision].update_step
        # Traced as for a GPU or TPU, where bf16 is used: with XLA's own convolutions rather
        # than the CPU's patch matmuls.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(patch_conv, "use_patch_conv", lambda *args: False)
            lowered = jax.jit(update).lower(state, batch)
        new_state, metrics = lowered.compile(compiler_options=_FAST_COMPILE)(state, batch)
        results[precision] = dict(text=lowered.as_text(), state=new_state, metrics=metrics)
    # The bf16 network's own initial state, by shape only (compiling it would add seconds).
    results["bfloat16"]["init_shapes"] = jax.eval_shape(lambda: init("bfloat16"))
    return state, results


def test_bf16_network_initialises_float32_parameters(runs):
    """Both precisions start from the same fp32 state: the bf16 init has its tree and dtypes."""
    state, results = runs
    shapes = results["bfloat16"]["init_shapes"]
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(state)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)


def test_bf16_loss_matches_fp32(runs):
    _, results = runs
    for key in ("loss", "detcon_loss"):
        fp32 = float(results["float32"]["metrics"][key])
        bf16 = float(results["bfloat16"]["metrics"][key])
        assert np.isfinite(bf16)
        assert abs(bf16 - fp32) <= LOSS_RTOL * abs(fp32), (key, fp32, bf16)
        # Not vacuous: bf16 really computed something different.
        assert bf16 != fp32, key


def test_bf16_updates_point_the_same_way(runs):
    state, results = runs
    before = jax.tree_util.tree_leaves(state.online_params)
    moves = {}
    for precision in results:
        after = jax.tree_util.tree_leaves(results[precision]["state"].online_params)
        moves[precision] = np.concatenate([np.ravel(a - b) for a, b in zip(after, before)])
    fp32, bf16 = moves["float32"], moves["bfloat16"]
    cosine = float(fp32 @ bf16 / (np.linalg.norm(fp32) * np.linalg.norm(bf16)))
    # One step of 4 images on ResNet-10: measured 0.88-0.97 over initial states (0.92 here);
    # unrelated updates of this many parameters would give ~0.
    assert cosine > 0.85, cosine


def test_parameters_optimizer_batchnorm_and_loss_stay_float32(runs):
    _, results = runs
    for precision, result in results.items():
        state = result["state"]
        for name in ("online_params", "target_params", "online_state", "target_state", "opt_state"):
            assert _floating_dtypes(getattr(state, name)) == {jnp.dtype(jnp.float32)}, (
                precision,
                name,
            )
        for key in ("loss", "detcon_loss", "classifier_loss"):
            assert result["metrics"][key].dtype == jnp.float32, (precision, key)


def test_bf16_step_convolves_and_multiplies_in_bf16(runs):
    _, results = runs
    bf16_convs = _convolutions(results["bfloat16"]["text"])
    fp32_convs = _convolutions(results["float32"]["text"])
    assert len(bf16_convs) == len(fp32_convs) > 0
    # Every convolution is the ResNet's (the augmentation's blur is a pair of fp32 matmuls):
    # forward, input-gradient and weight-gradient convolutions alike run in bf16.
    assert all(c[0] == 1 for c in bf16_convs), "no grouped convolutions expected"
    assert all(c[1:] == ("bf16", "bf16", "bf16") for c in bf16_convs), bf16_convs
    assert not any("bf16" in c for c in fp32_convs)
    bf16_dots = [d for d in _DOT.findall(results["bfloat16"]["text"]) if d == ("bf16",) * 3]
    assert bf16_dots, "the projector/predictor matmuls should run in bf16"
    assert "bf16" not in " ".join(str(d) for d in _DOT.findall(results["float32"]["text"]))


def test_unknown_precision_is_rejected():
    config = tiny_config()
    config.model.precision = "float16"
    with pytest.raises(ValueError, match="precision"):
        experiment_lib.build(config, TOTAL_STEPS)
