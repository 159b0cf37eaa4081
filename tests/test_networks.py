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


# ------------------------------------------------------------------- initialisation schemes


def _init_params(scheme: str, depth: int = 18) -> dict:
    """Parameters of a ResNet torso plus a ReLU-MLP head, a 'dense_head' and the probe."""

    def forward(x):
        with networks.init_scheme(scheme):
            fmap = networks.ResNetTorso(depth)(x, is_training=True)
            features = fmap.mean(axis=(1, 2))
            networks.ReluMLP(512, 128, name="projector")(features)
            networks.ReluMLP(512, 128, name="dense_head")(fmap)
            return networks.LinearClassifier(10)(features)

    params, _ = hk.transform_with_state(forward).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))
    )
    return params


def _torch_reference_std(shape_oihw: tuple, mode: str) -> float:
    """The std of torch.nn.init.kaiming_normal_ (relu) on a tensor of that shape, or the formula."""
    try:
        import torch
    except ImportError:
        out, inp, kh, kw = shape_oihw
        return math.sqrt(2.0 / ((out if mode == "fan_out" else inp) * kh * kw))
    torch.manual_seed(0)
    weight = torch.empty(shape_oihw)
    torch.nn.init.kaiming_normal_(weight, mode=mode, nonlinearity="relu")
    return float(weight.std())


@pytest.mark.parametrize("scheme, mode", [("torchvision", "fan_out"), ("densecl", "fan_in")])
def test_release_init_matches_pytorch_statistics_per_layer(scheme, mode):
    params = _init_params(scheme)
    last = lambda k: k.split("/")[-1]
    convs = {k: v["w"] for k, v in params.items() if last(k).startswith("conv_")}
    convs.update({k: v["w"] for k, v in params.items() if last(k).endswith("_conv")})
    assert len(convs) == 20  # ResNet-18: the stem, 16 block convs and 3 projections
    for name, w in convs.items():
        kh, kw, inp, out = w.shape
        expected = _torch_reference_std((out, inp, kh, kw), mode)
        # std of n normal draws has relative standard error 1/sqrt(2n) (n >= 4,096 here).
        tolerance = 10.0 / math.sqrt(2 * w.size)  # ours and torch's sample, 5 sigma each
        assert abs(float(jnp.std(w)) / expected - 1.0) < tolerance, name
        assert abs(float(jnp.mean(w))) < 5.0 * expected / math.sqrt(w.size), name
        # Untruncated, as PyTorch: Haiku's truncated normal would never exceed 2 std.
        assert float(jnp.abs(w).max()) > 2.5 * expected, name
    scales = [v["scale"] for k, v in params.items() if "batchnorm" in k]
    assert len(scales) == 20 and all(bool((s == 1.0).all()) for s in scales)  # no zero-init


def _uniform_bound(w: jax.Array) -> float:
    return 1.0 / math.sqrt(w.shape[0])


def test_release_init_of_heads_and_the_probe():
    tv, dense, haiku = (_init_params(s) for s in ("torchvision", "densecl", "haiku"))
    for name in ("projector/linear", "projector/linear_1", "dense_head/linear"):
        w, b = tv[name]["w"], tv[name]["b"]
        bound = _uniform_bound(w)  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert float(jnp.abs(w).max()) <= bound and float(jnp.abs(w).max()) > 0.95 * bound
        assert float(jnp.abs(b).max()) <= bound and float(jnp.abs(b).max()) > 0.5 * bound
        np.testing.assert_allclose(float(jnp.std(w)), bound / math.sqrt(3), rtol=0.05)
    # DenseCL's global neck: Kaiming normal fan_in with zero bias; its 1x1-conv head: default.
    w = dense["projector/linear"]["w"]
    np.testing.assert_allclose(float(jnp.std(w)), math.sqrt(2.0 / w.shape[0]), rtol=0.05)
    assert not bool(dense["projector/linear"]["b"].any())
    w = dense["dense_head/linear"]["w"]
    assert float(jnp.abs(w).max()) <= _uniform_bound(w)
    # The online probe is ours: Haiku's initialiser under every scheme.
    for params in (tv, dense):
        w = params["classifier/linear"]["w"]
        np.testing.assert_allclose(
            float(jnp.std(w)), float(jnp.std(haiku["classifier/linear"]["w"])), rtol=0.1
        )
    with pytest.raises(ValueError, match="config.model.init"):
        networks.init_scheme("pytorch")


def test_bottleneck_last_batch_norm_is_zero_under_haiku_and_one_under_torchvision():
    def bottleneck_group(scheme):
        def forward(x):
            with networks.init_scheme(scheme):
                cfg = networks.bn_config(None)
                group = hk.nets.ResNet.BlockGroup(  # the group ResNet-50's torso builds
                    64, 2, 1, cfg, resnet_v2=False, bottleneck=True, use_projection=True
                )
                return group(x, True, False)

        return hk.transform_with_state(forward).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 64))
        )[0]

    haiku, tv = bottleneck_group("haiku"), bottleneck_group("torchvision")
    last_bn = [k for k in haiku if k.endswith("batchnorm_2")]
    assert len(last_bn) == 2
    assert all(not bool(haiku[k]["scale"].any()) for k in last_bn)  # Haiku's zero-init residual
    assert all(bool((tv[k]["scale"] == 1.0).all()) for k in last_bn)  # torchvision's default
