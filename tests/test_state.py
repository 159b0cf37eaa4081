"""Initial state: online and target networks from their own keys, as the released DetCon-B."""

import jax
import numpy as np

from detcon.train import experiment as experiment_lib

from conftest import tiny_config


def test_online_and_target_start_from_the_two_halves_of_the_init_key():
    config = tiny_config()
    experiment = experiment_lib.build(config, 10, axis_name=None)
    network = experiment.network
    rng = jax.random.PRNGKey(3)
    state = experiment.init_state(rng)
    online = jax.tree_util.tree_leaves_with_path(state.online_params)
    target = jax.tree_util.tree_leaves_with_path(state.target_params)
    assert [p for p, _ in online] == [p for p, _ in target]
    weights = [(p, a, b) for (p, a), (_, b) in zip(online, target) if p[-1].key == "w"]
    assert len(weights) > 10
    for path, a, b in weights:  # every randomly initialised kernel differs at step 0
        assert not np.array_equal(a, b), jax.tree_util.keystr(path)

    # Same key discipline as the release: split(rng) -> (online, target); the run key is separate.
    online_rng, target_rng = jax.random.split(jax.random.split(rng)[0])
    view = experiment.method.dummy_view()
    expected_online, _ = network.init(online_rng, view, is_training=True)
    expected_target, _ = network.init(target_rng, view, is_training=True)
    for got, want in (
        (state.online_params, expected_online),
        (state.target_params, expected_target),
    ):
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
