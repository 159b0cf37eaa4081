"""ResNet torsos and heads: parameter counts, names, shapes, cross-replica BatchNorm."""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detcon.models import networks


def _param_count(depth: int, width: int = 1) -> int:
    shapes = jax.eval_shape(
        lambda: networks.torso_fn(depth, width).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), is_training=True
        )[0]
    )
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize(
    "depth, expected",
    [
        (50, 25_557_032 - 2048 * 1000 - 1000),  # torchvision resnet50 minus its fc
        (18, 11_689_512 - 512 * 1000 - 1000),  # torchvision resnet18 minus its fc
        (101, 44_549_160 - 2048 * 1000 - 1000),
    ],
)
def test_torso_parameter_count_matches_torchvision_without_fc(depth, expected):
    assert _param_count(depth) == expected


def test_resnet50_torso_has_exactly_23_508_032_parameters():
    assert _param_count(50) == 23_508_032


def test_width_multiplier_scales_channels():
    # Every conv's channel counts double, so conv weights grow ~4x (first conv only 2x).
    assert 3.9 < _param_count(50, 2) / _param_count(50) < 4.0


def test_haiku_resnet_names_and_stride_32_output():
    f = networks.torso_fn(50)
    shapes = jax.eval_shape(
        lambda: f.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), is_training=True)
    )
    params, state = shapes
    for name in [
        "res_net50/~/initial_conv",
        "res_net50/~/initial_batchnorm",
        "res_net50/~/block_group_0/~/block_0/~/conv_0",
        "res_net50/~/block_group_0/~/block_0/~/shortcut_conv",
        "res_net50/~/block_group_3/~/block_2/~/batchnorm_2",
    ]:
        assert name in params, name
    assert "res_net50/~/initial_batchnorm/~/mean_ema" in state
    # v1 bottleneck: the 3x3 conv (conv_1) carries the stride; conv_0 is 1x1.
    assert params["res_net50/~/block_group_1/~/block_0/~/conv_1"]["w"].shape == (3, 3, 128, 128)
    out = jax.eval_shape(
        lambda p, s: f.apply(p, s, None, jnp.zeros((2, 224, 224, 3)), False)[0], params, state
    )
    assert out.shape == (2, 7, 7, 2048)


def test_bad_depth_is_a_clear_error():
    with pytest.raises(ValueError, match="depth must be one of"):
        hk.transform(lambda x: networks.ResNetTorso(34 + 1)(x, True)).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))
        )


def test_mlp_head_shapes_and_no_final_bias():
    f = hk.transform_with_state(lambda x: networks.MLP(32, 8)(x, is_training=True))
    params, _ = f.init(jax.random.PRNGKey(0), jnp.zeros((4, 5, 16)))
    assert params["mlp/linear"]["w"].shape == (16, 32) and "b" in params["mlp/linear"]
    assert set(params["mlp/linear_1"]) == {"w"}  # Linear(256, no bias)
    out, _ = f.apply(
        params, f.init(jax.random.PRNGKey(0), jnp.zeros((4, 5, 16)))[1], None, jnp.ones((4, 5, 16))
    )
    assert out.shape == (4, 5, 8)


def test_classifier_gets_no_gradient_into_features():
    f = hk.transform(lambda x: networks.LinearClassifier(3)(x).sum())
    params = f.init(jax.random.PRNGKey(0), jnp.ones((2, 4)))
    grad = jax.grad(lambda x: f.apply(params, None, x))(jnp.ones((2, 4)))
    np.testing.assert_array_equal(grad, 0.0)


def test_cross_replica_batchnorm_equals_single_device_batch():
    """8 devices x 1 image with axis_name == 1 device x 8 images (Haiku's own check, for our torso)."""
    images = jax.random.uniform(jax.random.PRNGKey(1), (8, 32, 32, 3))

    def forward(x):
        return networks.ResNetTorso(10, axis_name="i")(x, is_training=True)

    f = hk.transform_with_state(forward)
    local = hk.transform_with_state(lambda x: networks.ResNetTorso(10)(x, is_training=True))
    params, state = local.init(jax.random.PRNGKey(0), images)
    expected, _ = jax.jit(local.apply)(params, state, None, images)
    sharded = jax.pmap(
        lambda x: f.apply(params, state, None, x)[0], axis_name="i", devices=jax.devices()[:8]
    )(images[:, None])
    np.testing.assert_allclose(np.asarray(sharded)[:, 0], expected, rtol=1e-4, atol=1e-4)


def test_classifier_starts_from_haiku_default_truncated_normal():
    # hk.Linear's default: normal with std 1/sqrt(fan_in), truncated at two standard deviations.
    fan_in, classes = 512, 100
    f = hk.transform(lambda x: networks.LinearClassifier(classes)(x))
    params = f.init(jax.random.PRNGKey(0), jnp.ones((2, fan_in)))["classifier/linear"]
    np.testing.assert_array_equal(params["b"], 0.0)
    w = np.asarray(params["w"], np.float64)
    std = 1.0 / math.sqrt(fan_in)
    # Variance of a unit normal truncated to [-2, 2]: 1 - 2 * 2 * pdf(2) / (cdf(2) - cdf(-2)).
    pdf2 = math.exp(-2.0) / math.sqrt(2.0 * math.pi)
    truncated_std = std * math.sqrt(1.0 - 4.0 * pdf2 / math.erf(2.0 / math.sqrt(2.0)))
    assert np.abs(w).max() <= 2.0 * std + 1e-7
    np.testing.assert_allclose(w.std(), truncated_std, rtol=0.02)
    np.testing.assert_allclose(w.mean(), 0.0, atol=0.05 * std)
