"""MoCo v2, DenseCL and DetCo: queues, shuffle BN, momentum order, losses as wired, torso stages,
jigsaw, checkpointed queues and the detectron2 export (the contract tests cover the rest)."""

import pickle

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detcon import devices as devices_lib
from detcon import methods
from detcon.models import heads as model_lib
from detcon.models import moco_heads, networks
from detcon.ops import losses, queues, shuffle_bn
from detcon.train import experiment as experiment_lib
from detcon.train import mock_data
from detcon.train import step as step_lib
from detcon.weights import export
from detcon.workdir import checkpoint as checkpoint_lib

from conftest import tiny_config

AXIS = step_lib.AXIS


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _method(name: str, batch_size: int = 8, **settings):
    config = tiny_config(batch_size=batch_size, method=name)
    for field, value in settings.items():
        config[name][field] = value
    return methods.get(name)(config, 100)


# ------------------------------------------------------------------------------------ queues


def test_enqueue_fills_in_order_and_wraps_to_overwrite_the_oldest():
    size, batch, dim = 12, 4, 3
    queue = np.asarray(queues.init_queue(jax.random.PRNGKey(0), size, dim))
    np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-6)
    reference, pointer = queue.copy(), jnp.zeros((), jnp.int32)
    batches = [np.full((batch, dim), float(t)) + np.arange(batch)[:, None] for t in range(5)]
    for t, keys in enumerate(batches):
        queue = queues.enqueue(jnp.asarray(queue), pointer, jnp.asarray(keys, jnp.float32))
        pointer = queues.advance(pointer, batch, size)
        start = (t * batch) % size
        reference[start : start + batch] = keys
        np.testing.assert_array_equal(np.asarray(queue), reference)
        assert int(pointer) == ((t + 1) * batch) % size
    # After 5 batches of 4 in a ring of 12: batches 3 and 4 overwrote batches 0 and 1.
    np.testing.assert_array_equal(reference[:4], batches[3])
    np.testing.assert_array_equal(reference[4:8], batches[4])
    np.testing.assert_array_equal(reference[8:], batches[2])


@pytest.mark.parametrize("name", ["moco_v2", "densecl", "detco"])
def test_queue_that_is_not_whole_global_batches_is_refused_before_compiling(name):
    config = tiny_config(batch_size=8, method=name)
    config[name].queue_size = 60
    with pytest.raises(
        ValueError,
        match=rf"--config.{name}.queue_size=60 .*multiple.*"
        r"--batch_size=8.*use e.g. 56",
    ):
        experiment_lib.build(config, 10)


def test_unknown_batch_norm_choice_is_refused():
    config = tiny_config(method="moco_v2")
    config.moco_v2.key_batch_norm = "sync"
    with pytest.raises(ValueError, match="key_batch_norm='sync'.*shuffle.*cross_replica"):
        experiment_lib.build(config, 10)


def _fake_outputs(rng: np.random.Generator, batch: int, stages: bool) -> moco_heads.MocoOutputs:
    dim, cells = 5, 4
    shape = (batch, 4, dim) if stages else (batch, dim)
    draw = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    return moco_heads.MocoOutputs(
        projection=draw(*shape),
        dense=draw(batch, cells, dim),
        backbone=draw(batch, cells, 6),
        local=draw(batch, 4, dim) if stages else None,
        logits=draw(batch, 3),
        features=draw(batch, 6),
    )


@pytest.mark.parametrize("name", ["moco_v2", "densecl", "detco"])
def test_keys_enqueued_in_global_batch_order_and_queue_equal_on_all_devices(name):
    devices, per_device = 4, 2
    method = _method(name, batch_size=devices * per_device, queue_size=16, projector_output_size=5)
    extra = method.init_extra()
    outputs = _fake_outputs(np.random.default_rng(0), devices * per_device, name == "detco")
    per_device_outputs = jax.tree_util.tree_map(
        lambda x: x.reshape((devices, per_device) + x.shape[1:]), outputs
    )
    replicated = jax.tree_util.tree_map(lambda x: jnp.stack([x] * devices), extra)

    update = jax.pmap(
        lambda e, o: method.update_extra(e, (o,), (o,), jnp.zeros(2, jnp.uint32), AXIS),
        axis_name=AXIS,
        devices=jax.devices()[:devices],
    )
    once = update(replicated, per_device_outputs)
    twice = update(once, per_device_outputs)
    for after, rows in ((once, slice(0, 8)), (twice, slice(8, 16))):
        after = jax.tree_util.tree_map(np.asarray, after)
        for leaf in jax.tree_util.tree_leaves(after):
            for d in range(1, devices):
                np.testing.assert_array_equal(leaf[d], leaf[0])
        assert int(after["queue_pointer"][0]) == rows.stop % 16
        projection = np.asarray(outputs.projection)
        if name == "detco":
            for s in range(4):
                np.testing.assert_allclose(
                    after["global_queues"][0, s, rows], _unit_rows(projection[:, s]), rtol=1e-6
                )
                np.testing.assert_allclose(
                    after["local_queues"][0, s, rows],
                    _unit_rows(np.asarray(outputs.local)[:, s]),
                    rtol=1e-6,
                )
            continue
        np.testing.assert_allclose(after["queue"][0, rows], _unit_rows(projection), rtol=1e-6)
        if name == "densecl":
            pooled = np.asarray(outputs.dense).mean(axis=1)
            np.testing.assert_allclose(after["dense_queue"][0, rows], _unit_rows(pooled), rtol=1e-5)
    untouched = np.asarray(extra["queue" if name != "detco" else "global_queues"])
    assert not np.allclose(
        np.asarray(once["queue" if name != "detco" else "global_queues"])[0], untouched
    )


# ---------------------------------------------------------------------------------- shuffle BN


def test_shuffle_permutes_across_devices_and_unshuffle_restores_exactly():
    devices, per_device = 4, 3
    x = np.arange(devices * per_device * 2, dtype=np.float32).reshape(devices, per_device, 2)
    key = jax.random.PRNGKey(7)

    def roundtrip(x):
        perm = shuffle_bn.permutation(key, per_device, AXIS)
        shuffled = shuffle_bn.shuffle(x, perm, AXIS)
        return shuffled, shuffle_bn.unshuffle(shuffled, perm, AXIS), perm

    shuffled, restored, perm = jax.pmap(roundtrip, axis_name=AXIS, devices=jax.devices()[:devices])(
        x
    )
    np.testing.assert_array_equal(np.asarray(restored), x)
    perm = np.asarray(perm[0])
    assert sorted(perm) == list(range(devices * per_device))
    np.testing.assert_array_equal(np.asarray(shuffled).reshape(-1, 2), x.reshape(-1, 2)[perm])
    # Rows really change device, so BatchNorm on a device sees other examples.
    moved = perm // per_device != np.arange(devices * per_device) // per_device
    assert moved.sum() >= devices * per_device // 2


def test_shuffled_key_forward_equals_plain_forward_with_global_batch_norm(monkeypatch):
    devices = 4
    method = _method("moco_v2", key_batch_norm="shuffle")
    config = method.config
    params, state = method.make_network(None).init(
        jax.random.PRNGKey(1), method.dummy_view(), is_training=True
    )
    images = mock_data.mock_batch(0, 0, np.arange(8), config.data.image_size, 4)["view2"]
    inputs = model_lib.GlobalView(jnp.asarray(images).reshape(devices, 2, *images.shape[1:]))
    # With cross-replica statistics BatchNorm ignores the order of the batch, so the shuffled
    # path must give every example exactly its own key.
    monkeypatch.setattr(
        method,
        "_network",
        lambda cross_replica, axis_name: moco_heads.make_network(
            config.model, method.heads(), axis_name
        ),
    )

    def keys(shuffle: bool):
        method.settings.key_batch_norm = "shuffle" if shuffle else "cross_replica"
        run = jax.pmap(
            lambda v: (
                method.target_forward(None, params, state, (v,), jax.random.PRNGKey(3), AXIS)
                .outputs[0]
                .projection
            ),
            axis_name=AXIS,
            devices=jax.devices()[:devices],
        )
        return np.asarray(run(inputs))

    plain, shuffled = keys(False), keys(True)
    np.testing.assert_allclose(shuffled, plain, rtol=2e-4, atol=2e-5)
    assert np.abs(plain[0, 0] - plain[1, 0]).max() > 1e-4  # examples do differ


# ------------------------------------------------------------------------- momentum encoder


def test_target_follows_mocos_update_before_the_key_forward():
    """Stored target at the start of step t == MoCo's k_t = m k_{t-1} + (1 - m) q_t, k_{-1} = q_0."""
    config = tiny_config(method="moco_v2")
    config.moco_v2.momentum = 0.9  # far from 1 so that the recursion is visible
    config.optim.base_learning_rate = 3.0
    experiment = experiment_lib.build(config, 100)
    devices = jax.devices()[:1]
    p_step = step_lib.pmap_update_step(experiment.update_step, devices=devices)
    state = devices_lib.replicate(experiment.init_state(jax.random.PRNGKey(0)), devices)
    online, target = [], []
    for t in range(3):
        host = devices_lib.unreplicate(state)
        online.append(host.online_params)
        target.append(host.target_params)
        batch = mock_data.mock_batch(0, t, np.arange(8), config.data.image_size, 4)
        state, _ = p_step(state, devices_lib.shard({k: v[None] for k, v in batch.items()}, devices))
    m = 0.9
    k = online[0]
    for t in range(3):
        k = jax.tree_util.tree_map(lambda kk, q: m * kk + (1 - m) * q, k, online[t])
        chex.assert_trees_all_close(target[t], k, rtol=1e-5, atol=1e-6)
    moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), online[2], online[0])
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4


# ----------------------------------------------------------------------------- losses wired


def test_densecl_method_loss_is_densecl_loss_and_warmup_is_moco():
    method = _method("densecl", queue_size=16, projector_output_size=5, dense_warmup_steps=3)
    rng = np.random.default_rng(1)
    q, k = _fake_outputs(rng, 8, False), _fake_outputs(rng, 8, False)
    extra = method.init_extra()
    args = (
        q.projection,
        k.projection,
        extra["queue"],
        q.dense,
        k.dense,
        q.backbone,
        k.backbone,
        extra["dense_queue"],
    )
    warm, metrics = method.loss((q,), (k,), (), extra, None)
    np.testing.assert_allclose(
        warm,
        losses.moco_loss(q.projection, k.projection, extra["queue"], temperature=0.2),
        rtol=1e-6,
    )
    assert float(metrics["dense_weight"]) == 0.0
    after, _ = method.loss((q,), (k,), (), dict(extra, updates=jnp.asarray(3)), None)
    np.testing.assert_allclose(
        after, losses.densecl_loss(*args, temperature=0.2, dense_weight=0.5), rtol=1e-6
    )


def test_detco_method_loss_is_detco_loss_with_the_papers_stage_weights():
    method = _method("detco", queue_size=16, projector_output_size=5)
    assert tuple(method.settings.stage_weights) == (0.1, 0.4, 0.7, 1.0)
    rng = np.random.default_rng(2)
    q, k = _fake_outputs(rng, 8, True), _fake_outputs(rng, 8, True)
    extra = method.init_extra()
    got, _ = method.loss((q,), (k,), (), extra, None)
    t = lambda x: jnp.swapaxes(x, 0, 1)
    want = losses.detco_loss(
        t(q.projection),
        t(q.local),
        t(k.projection),
        t(k.local),
        extra["global_queues"],
        extra["local_queues"],
        jnp.asarray([0.1, 0.4, 0.7, 1.0]),
        temperature=0.2,
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_flops_count_one_query_and_one_key_view_and_detcos_patches():
    moco = _method("moco_v2")
    assert moco.flops_per_image(1.0) == 4.0  # query forward + backward (3) + key forward (1)
    detco = _method("detco", patch_size=32)
    assert detco.flops_per_image(1.0) == pytest.approx(4.0 * (1 + 9 * 32**2 / 64**2))
    assert methods.get("byol")(tiny_config(method="byol"), 10).flops_per_image(1.0) == 8.0


# ---------------------------------------------------------------------- torso stages, jigsaw


def test_torso_stage_outputs_come_from_the_same_pass_and_parameters():
    def forward(x, stages, is_training=True):
        return networks.ResNetTorso(10)(x, is_training=is_training, return_stages=stages)

    plain = hk.transform_with_state(lambda x, **kw: forward(x, False, **kw))
    staged = hk.transform_with_state(lambda x, **kw: forward(x, True, **kw))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    params, state = plain.init(jax.random.PRNGKey(0), x)
    params_s, _ = staged.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params_s)
    last, _ = plain.apply(params, state, None, x, is_training=False)
    stages, _ = staged.apply(params, state, None, x, is_training=False)
    assert [s.shape for s in stages] == [
        (2, 16, 16, 64),
        (2, 8, 8, 128),
        (2, 4, 4, 256),
        (2, 2, 2, 512),
    ]
    assert tuple(s.shape[-1] for s in stages) == networks.stage_channels(10)
    np.testing.assert_array_equal(stages[-1], last)


def test_jigsaw_cuts_a_row_major_three_by_three_grid():
    images = np.random.default_rng(0).random((2, 96, 96, 3)).astype(np.float32)
    patches = np.asarray(moco_heads.jigsaw(jnp.asarray(images), 32))
    assert patches.shape == (2, 9, 32, 32, 3)
    for r in range(3):
        for c in range(3):
            np.testing.assert_array_equal(
                patches[:, 3 * r + c], images[:, 32 * r : 32 * (r + 1), 32 * c : 32 * (c + 1)]
            )


# ----------------------------------------------------------------- checkpoint and export


def test_queues_restore_exactly_and_densecl_exports_for_detectron2(tmp_path):
    config = tiny_config(method="densecl")
    experiment = experiment_lib.build(config, 10)
    state = experiment.init_state(jax.random.PRNGKey(0))
    rng = np.random.default_rng(3)
    extra = dict(
        state.extra,
        queue=_unit_rows(rng.normal(size=state.extra["queue"].shape)).astype(np.float32),
        dense_queue=rng.normal(size=state.extra["dense_queue"].shape).astype(np.float32),
        queue_pointer=np.asarray(24, np.int32),
        updates=np.asarray(3, np.int32),
    )
    state = state._replace(extra=extra, step=jnp.asarray(3, jnp.int32))
    manager = checkpoint_lib.make_manager(str(tmp_path), 2)
    checkpoint_lib.save(manager, state, {"config": config.to_dict(), "method": "densecl"})
    template = experiment.init_state(jax.random.PRNGKey(1))
    restored, _ = checkpoint_lib.restore(manager, template)
    manager.close()
    for key, value in extra.items():
        np.testing.assert_array_equal(np.asarray(restored.extra[key]), value, err_msg=key)

    params, net_state, saved = checkpoint_lib.load_network(str(tmp_path), "online")
    path = export.export_torso(
        params, net_state, saved["model"]["depth"], "detectron2", str(tmp_path / "densecl_r10")
    )[0]
    with open(path, "rb") as f:
        model = pickle.load(f, encoding="latin1")["model"]
    expected = export.haiku_to_detectron2(params, net_state, 10)
    assert list(model) == list(expected) and "stem.conv1.weight" in model
    for k, v in expected.items():
        np.testing.assert_array_equal(model[k], v, err_msg=k)
    assert not any("dense_head" in k or "projector" in k for k in model)


def test_official_batch_norm_keeps_state_dtypes_equal_on_devices_and_traces_once():
    """Per-device query BN and shuffle BN: averages are made equal over devices, counters stay
    integers, so the replicated state is one state and the step compiles once."""
    config = tiny_config(method="moco_v2")
    assert config.moco_v2.query_batch_norm == "per_device"
    assert config.moco_v2.key_batch_norm == "shuffle"
    experiment = experiment_lib.build(config, 100)
    devices = jax.devices()[:4]
    chex.clear_trace_counter()
    p_step = step_lib.pmap_update_step(
        chex.assert_max_traces(experiment.update_step, n=1), devices=devices
    )
    init = experiment.init_state(jax.random.PRNGKey(0))
    state = devices_lib.replicate(init, devices)
    for t in range(2):
        batch = mock_data.mock_batch(0, t, np.arange(8), config.data.image_size, 4)
        state, metrics = p_step(
            state,
            devices_lib.shard(
                {k: v.reshape((4, 2) + v.shape[1:]) for k, v in batch.items()}, devices
            ),
        )
    assert np.isfinite(np.asarray(metrics["loss"])).all()
    for before, after in zip(jax.tree_util.tree_leaves(init), jax.tree_util.tree_leaves(state)):
        assert after.dtype == before.dtype
    for tree in (state.online_state, state.target_state, state.extra):
        for leaf in jax.tree_util.tree_leaves(tree):
            leaf = np.asarray(leaf)
            for d in range(1, 4):
                np.testing.assert_allclose(leaf[d], leaf[0], rtol=1e-6, atol=1e-7)
    chex.clear_trace_counter()
