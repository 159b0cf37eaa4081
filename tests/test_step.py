"""The pmapped DetCon-B step: device-split invariance, exact EMA, learning, single trace."""

import chex
import jax
import numpy as np
import pytest

from detcon import devices as devices_lib
from detcon import methods
from detcon.methods.base import target_ema
from detcon.train import experiment as experiment_lib
from detcon.train import mock_data, optim
from detcon.train import step as step_lib

from conftest import load_config, tiny_config

TOTAL_STEPS = 100

# The module's fixtures compile one step that several tests run and whose traces are counted.
pytestmark = pytest.mark.keeps_compiled_programs


def _setup(config):
    experiment = experiment_lib.build(config, TOTAL_STEPS)
    return experiment.init_state(jax.random.PRNGKey(0)), experiment.update_step


def _batch(config, step, num_devices):
    return mock_data.device_batch(
        0,
        step,
        num_devices,
        config.training.batch_size // num_devices,
        config.data.image_size,
        config.model.num_classes,
    )


def _run(config, state, update, num_devices, steps):
    devices = jax.devices()[:num_devices]
    p_step = step_lib.pmap_update_step(update, devices=devices)
    replicated = devices_lib.replicate(state, devices)
    losses = []
    for t in range(steps):
        replicated, metrics = p_step(
            replicated, devices_lib.shard(_batch(config, t, num_devices), devices)
        )
        losses.append(float(devices_lib.unreplicate(metrics)["loss"]))
    return devices_lib.unreplicate(replicated), losses


@pytest.fixture(scope="module")
def one_vs_four():
    config = tiny_config(batch_size=8)
    state, update = _setup(config)
    one = _run(config, state, update, 1, 2)
    four = _run(config, state, update, 4, 2)
    return state, one, four


def test_one_device_equals_four_devices(one_vs_four):
    _, (s1, l1), (s4, l4) = one_vs_four
    np.testing.assert_allclose(l1, l4, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(s1.online_params, s4.online_params, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(s1.target_params, s4.target_params, rtol=1e-4, atol=1e-4)
    chex.assert_trees_all_close(s1.online_state, s4.online_state, rtol=1e-4, atol=1e-4)
    # The step really moved the parameters (the comparison above is not vacuous).
    assert int(s1.step) == 2
    moved = jax.tree_util.tree_map(
        lambda a, b: float(np.abs(a - b).max()), s1.online_params, one_vs_four[0].online_params
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4


@pytest.fixture(scope="module")
def two_devices():
    """One compiled step on 2 devices, shared by the tests below; its trace count is checked."""
    config = tiny_config(batch_size=8)
    config.optim.warmup_fraction = 0.0
    config.optim.base_learning_rate = 100.0  # lr 3.1 at batch 8: BYOL's 0.2 x 4096 / 256
    state, update = _setup(config)
    devices = jax.devices()[:2]
    counted = chex.assert_max_traces(update, n=1)
    p_step = step_lib.pmap_update_step(counted, devices=devices)
    yield config, state, lambda s, b: p_step(s, devices_lib.shard(b, devices)), devices
    chex.clear_trace_counter()


def test_ema_update_is_exact(two_devices):
    config, state, p_step, devices = two_devices
    # Make target differ from online so the EMA formula is visible.
    state = state._replace(
        target_params=jax.tree_util.tree_map(lambda x: x * 0.5 + 0.1, state.target_params)
    )
    replicated, _ = p_step(devices_lib.replicate(state, devices), _batch(config, 0, 2))
    new = devices_lib.unreplicate(replicated)
    tau = float(target_ema(0, base_ema=config.detcon_b.base_ema, total_steps=TOTAL_STEPS))
    assert tau == pytest.approx(config.detcon_b.base_ema)
    expected = jax.tree_util.tree_map(
        lambda t, o: tau * t + (1 - tau) * o, state.target_params, new.online_params
    )
    chex.assert_trees_all_close(new.target_params, expected, rtol=1e-6, atol=1e-7)


def test_loss_falls_on_a_fixed_batch(two_devices):
    config, state, p_step, devices = two_devices
    replicated = devices_lib.replicate(state, devices)
    batch = _batch(config, 0, 2)
    detcon = []
    for _ in range(30):
        replicated, metrics = p_step(replicated, batch)
        detcon.append(float(devices_lib.unreplicate(metrics)["detcon_loss"]))
    first, last = np.mean(detcon[:5]), np.mean(detcon[-5:])
    assert np.all(np.isfinite(detcon))
    assert last < first - 0.1, (first, last, detcon)


def test_step_traced_once(two_devices):
    """After the tests above ran it many times, the step was traced exactly once."""
    config, state, p_step, devices = two_devices
    replicated = devices_lib.replicate(state, devices)
    for t in range(2):  # fresh placement and new data reuse the compiled step
        replicated, _ = p_step(replicated, _batch(config, t, 2))


@pytest.mark.parametrize("method", ["detcon_b", "simclr"])
def test_one_pass_over_both_views_equals_one_pass_per_view(method):
    """Stacked views with per-view BatchNorm give the two-pass loss, gradients and BN state."""
    results = {}
    for one_pass in (False, True):
        config = tiny_config(batch_size=4, method=method)
        config.model.one_pass_views = one_pass
        config.optim.warmup_fraction = 0.0
        experiment = experiment_lib.build(config, TOTAL_STEPS, axis_name=None)
        state = experiment.init_state(jax.random.PRNGKey(0))
        batch = {k: v[0] for k, v in _batch(config, 0, 1).items()}
        views = tuple(
            experiment.method.view_inputs(
                step_lib.example_keys(state.rng, state.step, batch["index"], 4)[
                    :, 2 * v : 2 * v + 2
                ],
                batch,
                v,
            )
            for v in range(2)
        )

        def objective(params, experiment=experiment, state=state, views=views, one_pass=one_pass):
            forward = methods.forward_views(
                experiment.network, params, state.online_state, views, one_pass, is_training=True
            )
            target = forward.outputs if experiment.method.has_target else None
            loss, _ = experiment.method.loss(forward.outputs, target, views, state.extra, None)
            return loss, forward.state

        (loss, net_state), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
            state.online_params
        )
        new_state, metrics = jax.jit(experiment.update_step)(state, batch)
        results[one_pass] = (loss, grads, net_state, new_state, metrics)
    two, one = results[False], results[True]
    np.testing.assert_allclose(one[0], two[0], rtol=1e-5, atol=1e-5)
    # Gradients to 3e-5 of the largest gradient: the per-view statistics are summed in another
    # order, SimCLR's temperature 0.1 makes some gradients O(1), and the gradients that are zero
    # in exact arithmetic (a bias before BatchNorm) carry that rounding. DetCon-B meets 1e-5.
    scale = max(max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(two[1])), 1.0)
    tolerance = (1e-5 if method == "detcon_b" else 3e-5) * scale
    for a, b in zip(*(jax.tree_util.tree_leaves_with_path(g) for g in (one[1], two[1]))):
        assert float(np.abs(a[1] - b[1]).max()) <= tolerance, jax.tree_util.keystr(a[0])
    chex.assert_trees_all_close(one[2], two[2], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(one[3].online_state, two[3].online_state, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(one[3].target_state, two[3].target_state, rtol=1e-5, atol=1e-6)
    # LARS scales each layer's update by |w| / |g|, amplifying rounding in near-zero gradients.
    chex.assert_trees_all_close(one[3].online_params, two[3].online_params, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(one[4]["loss"], two[4]["loss"], rtol=1e-5, atol=1e-5)
    # Not vacuous: the BatchNorm averages moved away from their initial values.
    moved = jax.tree_util.tree_map(
        lambda a, b: float(np.abs(np.asarray(a) - b).max()),
        one[2],
        experiment.init_state(jax.random.PRNGKey(0)).online_state,
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3


def test_detcon_b_config_warms_up_by_the_released_rule():
    config = load_config("detcon_b")
    config.data.num_train_examples = 1_281_167  # what the run takes from ImageNet's manifest
    total = 1000 * 1_281_167 // 4096
    assert optim.warmup_steps(config, total) == 3127  # round(0.01 * total) would be 3128
    config.training.pretrain_epochs = 350
    assert optim.warmup_steps(config, 350 * 1_281_167 // 4096) == 938
    config.optim.warmup_rule = "fraction"
    assert optim.warmup_steps(config, 1000) == 10
    config.optim.warmup_rule = "linear"
    with pytest.raises(ValueError, match="warmup_rule='linear' is unknown"):
        optim.warmup_steps(config, 1000)
    config.optim.warmup_rule = "released"
    config.data.num_train_examples = -1
    with pytest.raises(ValueError, match="num_train_examples > 0"):
        optim.warmup_steps(config, 1000)
    # The demo trains 50 epochs, so it keeps a warm-up fraction.
    assert load_config("demo").optim.warmup_rule == "fraction"
