"""LARS against a NumPy transcription of the released chain; lr and EMA schedules at hand-computed steps."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from detcon.methods.base import target_ema
from detcon.train import optim


def _haiku_params(rng: np.random.Generator) -> dict:
    """Haiku-style params: conv kernel, Linear w (zero init) and b, BatchNorm scale and offset."""
    return {
        "conv2_d": {"w": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
        "linear": {
            "w": np.zeros((4, 3), np.float32),
            "b": rng.normal(size=(3,)).astype(np.float32),
        },
        "batch_norm": {
            "scale": (1.0 + rng.normal(size=(4,))).astype(np.float32),
            "offset": rng.normal(size=(4,)).astype(np.float32),
        },
    }


_ADAPTED = {("conv2_d", "w"), ("linear", "w")}


def _official_learning_rate(
    step: int, base: float, batch_size: int, total: int, warmup: int
) -> float:
    """The released learning_schedule in float64: linear warm-up, then 0.5 (1 + cos) decay."""
    peak = base * batch_size / 256.0
    if step < warmup:
        return peak * step / warmup
    progress = min(step - warmup, total - warmup) / (total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def _lars_reference(
    params: dict,
    grads_per_step: list,
    learning_rates: list,
    weight_decay: float,
    trust_coefficient: float,
    momentum: float,
) -> list:
    """Updates per step of the released LARS: wd add -> trust ratio -> momentum -> times -lr."""
    params = {m: {n: np.asarray(v, np.float64) for n, v in d.items()} for m, d in params.items()}
    trace = {(m, n): 0.0 for m, d in params.items() for n in d}
    all_updates = []
    for grads, lr in zip(grads_per_step, learning_rates):
        updates = {}
        for module, leaves in params.items():
            for name, w in leaves.items():
                u = np.asarray(grads[module][name], np.float64)
                if (module, name) in _ADAPTED:
                    u = u + weight_decay * w
                    w_norm, u_norm = np.sqrt(np.sum(w * w)), np.sqrt(np.sum(u * u))
                    both_positive = w_norm > 0 and u_norm > 0
                    ratio = trust_coefficient * w_norm / u_norm if both_positive else 1.0
                    u = u * ratio
                trace[module, name] = u + momentum * trace[module, name]
                updates.setdefault(module, {})[name] = -lr * trace[module, name]
        for module, leaves in params.items():
            for name in leaves:
                leaves[name] = leaves[name] + updates[module][name]
        all_updates.append(updates)
    return all_updates


def test_lars_mask_marks_biases_and_batchnorm():
    mask = optim.lars_mask(_haiku_params(np.random.default_rng(0)))
    assert mask == {
        "conv2_d": {"w": True},
        "linear": {"w": True, "b": False},
        "batch_norm": {"scale": False, "offset": False},
    }


def test_lars_matches_released_chain_through_warmup_and_cosine():
    rng = np.random.default_rng(1)
    params = _haiku_params(rng)
    num_steps, total, warmup = 12, 14, 4  # steps 0-3 warm up, 4-11 decay
    grads_per_step = [
        jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        for _ in range(num_steps)
    ]
    # Large decay and coefficient so both visibly change the adapted leaves.
    base, batch_size, weight_decay, coefficient, momentum = 0.5, 512, 0.1, 0.02, 0.9
    rates = [_official_learning_rate(t, base, batch_size, total, warmup) for t in range(num_steps)]
    assert rates[0] == 0.0 and rates[warmup] == max(rates) == 1.0
    expected = _lars_reference(params, grads_per_step, rates, weight_decay, coefficient, momentum)

    schedule = functools.partial(
        optim.learning_rate,
        base_learning_rate=base,
        batch_size=batch_size,
        total_steps=total,
        warmup_steps=warmup,
    )
    optimizer = optim.lars(
        schedule, weight_decay=weight_decay, trust_coefficient=coefficient, momentum=momentum
    )
    update_fn = jax.jit(optimizer.update)
    current = jax.tree_util.tree_map(jnp.asarray, params)
    opt_state = optimizer.init(current)
    for step, grads in enumerate(grads_per_step):
        updates, opt_state = update_fn(grads, opt_state, current)
        for module, leaves in expected[step].items():
            for name, want in leaves.items():
                np.testing.assert_allclose(
                    np.asarray(updates[module][name]),
                    want,
                    rtol=2e-5,
                    atol=1e-7,
                    err_msg=f"{step} {module}/{name}",
                )
        current = optax.apply_updates(current, updates)

    # Excluded leaves follow momentum SGD with the rate outside the trace:
    # -lr(t) * sum_k momentum^k g_{t-k}, so the step-0 gradient still counts at step 1.
    g = [np.asarray(grads["linear"]["b"], np.float64) for grads in grads_per_step]
    np.testing.assert_allclose(np.asarray(expected[0]["linear"]["b"]), 0.0)
    np.testing.assert_allclose(
        expected[1]["linear"]["b"], -rates[1] * (g[1] + momentum * g[0]), rtol=1e-12
    )
    trace = sum(momentum**k * g[num_steps - 1 - k] for k in range(num_steps))
    np.testing.assert_allclose(np.asarray(updates["linear"]["b"]), -rates[-1] * trace, rtol=2e-5)
    # optax.lars scales before the trace: a different optimiser whenever the rate changes.
    old = optax.lars(
        schedule,
        weight_decay=weight_decay,
        weight_decay_mask=optim.lars_mask,
        trust_coefficient=coefficient,
        trust_ratio_mask=optim.lars_mask,
        momentum=momentum,
    )
    old_state = old.init(params)
    old_updates, old_state = old.update(grads_per_step[0], old_state, params)
    old_updates, _ = old.update(grads_per_step[1], old_state, params)
    assert np.abs(np.asarray(old_updates["linear"]["b"]) - expected[1]["linear"]["b"]).max() > 0.01


def test_lars_with_a_constant_rate_scales_the_trace():
    params = {"linear": {"b": jnp.ones((2,))}}
    grads = {"linear": {"b": jnp.array([1.0, -2.0])}}
    optimizer = optim.lars(0.1, momentum=0.5)
    state = optimizer.init(params)
    first, state = optimizer.update(grads, state, params)
    second, _ = optimizer.update(grads, state, params)
    np.testing.assert_allclose(first["linear"]["b"], [-0.1, 0.2], rtol=1e-6)
    np.testing.assert_allclose(second["linear"]["b"], [-0.15, 0.3], rtol=1e-6)  # -0.1 (g + 0.5 g)


def _torch_sgd_reference(
    params: dict, grads_per_step: list, lrs: list, weight_decay: float, momentum: float
) -> list:
    """Parameters after each step of torch.optim.SGD (dampening 0, no Nesterov), transcribed:
    d_p = g + wd * p; buf = d_p at the first step, else momentum * buf + d_p; p -= lr * buf."""
    params = {m: {n: np.asarray(v, np.float64) for n, v in d.items()} for m, d in params.items()}
    buffers, history = {}, []
    for lr, grads in zip(lrs, grads_per_step):
        for module, leaves in params.items():
            for name, p in leaves.items():
                d_p = np.asarray(grads[module][name], np.float64) + weight_decay * p
                key = (module, name)
                buffers[key] = d_p if key not in buffers else momentum * buffers[key] + d_p
                leaves[name] = p - lr * buffers[key]
        history.append({m: dict(d) for m, d in params.items()})
    return history


def test_sgd_matches_torch_sgd_with_weight_decay_on_every_parameter():
    rng = np.random.default_rng(2)
    params = _haiku_params(rng)
    grads_per_step = [
        jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
        for _ in range(4)
    ]
    lrs = [0.3, 0.2, 0.1, 0.05]
    # A large decay so that its effect on biases and BatchNorm leaves (MoCo decays all) shows.
    weight_decay, momentum = 0.1, 0.9
    expected = _torch_sgd_reference(params, grads_per_step, lrs, weight_decay, momentum)
    optimizer = optim.sgd(
        lambda count: jnp.asarray(lrs)[count], weight_decay=weight_decay, momentum=momentum
    )
    current = jax.tree_util.tree_map(jnp.asarray, params)
    opt_state = optimizer.init(current)
    for step, grads in enumerate(grads_per_step):
        updates, opt_state = jax.jit(optimizer.update)(grads, opt_state, current)
        current = optax.apply_updates(current, updates)
        for module, leaves in expected[step].items():
            for name, want in leaves.items():
                np.testing.assert_allclose(
                    np.asarray(current[module][name]),
                    want,
                    rtol=1e-5,
                    atol=1e-6,
                    err_msg=f"{step} {module}/{name}",
                )
    # Decay reached the BatchNorm offset: without it the result would differ.
    no_decay = _torch_sgd_reference(params, grads_per_step, lrs, 0.0, momentum)
    assert (
        np.abs(no_decay[-1]["batch_norm"]["offset"] - expected[-1]["batch_norm"]["offset"]).max()
        > 1e-3
    )


def test_make_optimizer_builds_sgd_and_names_the_choices():
    import ml_collections

    config = ml_collections.ConfigDict(
        dict(
            optim=dict(
                name="sgd",
                base_learning_rate=0.03,
                warmup_rule="fraction",
                warmup_fraction=0.0,
                weight_decay=1e-4,
                momentum=0.9,
                trust_coefficient=1e-3,
            ),
            training=dict(batch_size=512),
        )
    )
    optimizer = optim.make_optimizer(config, 100)
    params = {"linear": {"w": jnp.ones((2,))}}
    updates, _ = optimizer.update(
        {"linear": {"w": jnp.zeros((2,))}}, optimizer.init(params), params
    )
    # Step 0, no warm-up: lr 0.03 * 512 / 256 on the decay term alone.
    np.testing.assert_allclose(updates["linear"]["w"], -0.06 * 1e-4, rtol=1e-5)
    config.optim.name = "adam"
    with pytest.raises(ValueError, match="--config.optim.name='adam'.*'lars', 'sgd' or 'adamw'"):
        optim.make_optimizer(config, 100)


def test_lars_accepts_a_schedule():
    params = {"linear": {"b": jnp.ones((2,))}}
    grads = {"linear": {"b": jnp.array([1.0, -2.0])}}
    optimizer = optim.lars(lambda count: 0.1 * (count + 1), momentum=0.5)
    state = optimizer.init(params)
    first, state = optimizer.update(grads, state, params)
    second, _ = optimizer.update(grads, state, params)
    np.testing.assert_allclose(first["linear"]["b"], [-0.1, 0.2], rtol=1e-6)
    # -lr(1) * (g + 0.5 g) = -0.2 * 1.5 g = -0.3 g
    np.testing.assert_allclose(second["linear"]["b"], [-0.3, 0.6], rtol=1e-6)


_LR_KWARGS = dict(base_learning_rate=0.2, batch_size=512, total_steps=1000, warmup_steps=100)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (50, 0.2),  # half-way through warm-up to peak 0.4
        (100, 0.4),  # end of warm-up: the peak
        (325, 0.2 * (1 + math.sqrt(0.5))),  # a quarter into the cosine
        (550, 0.2),  # half-way through the cosine
        (999, 0.4 * math.sin(math.pi / 1800) ** 2),  # last step: 0.2 * (1 - cos(pi / 900))
        (1000, 0.0),
        (5000, 0.0),  # clamped beyond the end
    ],
)
def test_learning_rate_schedule(step, expected):
    got = jax.jit(lambda s: optim.learning_rate(s, **_LR_KWARGS))(jnp.int32(step))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5, atol=1e-9)


def test_learning_rate_without_warmup_starts_at_peak():
    got = optim.learning_rate(
        0, base_learning_rate=0.3, batch_size=256, total_steps=10, warmup_steps=0
    )
    np.testing.assert_allclose(float(got), 0.3, rtol=1e-6)


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.99),
        (250, 1 - 0.01 * (1 + math.sqrt(0.5)) / 2),
        (500, 0.995),
        (1000, 1.0),
        (2000, 1.0),
    ],
)
def test_target_ema_schedule(step, expected):
    got = jax.jit(lambda s: target_ema(s, base_ema=0.99, total_steps=1000))(jnp.int32(step))
    np.testing.assert_allclose(float(got), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "epochs, batch_size, expected",
    [
        (1000, 4096, 3127),  # 10 epochs: 12,811,670 // 4096
        (300, 4096, 938),  # 3 epochs: 3,843,501 // 4096
        (350, 4096, 938),  # still 3 epochs: the epoch count is floored first
        (99, 4096, 0),  # under 100 epochs there is no warm-up
        (1000, 256, 50045),  # 12,811,670 // 256
    ],
)
def test_released_warmup_steps(epochs, batch_size, expected):
    assert optim.released_warmup_steps(epochs, 1_281_167, batch_size) == expected
