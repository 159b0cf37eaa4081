"""The CPU patch-matmul convolution equals XLA's conv, and the torso's parameters are unchanged."""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detcon.models import networks, patch_conv

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _native(x: jax.Array, w: jax.Array, stride: int, padding: str) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), padding, dimension_numbers=DIMENSIONS
    )


@pytest.mark.parametrize(
    "size, kernel, stride, padding",
    [
        (2, 3, 1, "SAME"),  # ResNet's last stage at 64 px
        (4, 3, 2, "SAME"),
        (7, 3, 2, "SAME"),  # odd map: SAME pads more on the high side
        (9, 7, 2, "SAME"),  # the stem's kernel
        (8, 1, 2, "SAME"),  # projection shortcut
        (6, 3, 1, "VALID"),
        (5, 2, 2, "VALID"),
    ],
)
def test_patch_conv_equals_xla_conv_and_its_gradients(size, kernel, stride, padding):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(size * 10 + kernel), 3)
    x = jax.random.normal(kx, (3, size, size + 1, 5))
    w = jax.random.normal(kw, (kernel, kernel, 5, 4))
    expected = _native(x, w, stride, padding)
    got = patch_conv.patch_conv(x, w, stride, padding)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(kg, expected.shape)

    @functools.partial(jax.jit, static_argnums=0)
    def pullback(conv):
        return jax.vjp(lambda a, b: conv(a, b, stride, padding), x, w)[1](cotangent)

    for got_grad, expected_grad in zip(pullback(patch_conv.patch_conv), pullback(_native)):
        np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_same_padding_matches_xla_for_every_small_case():
    for size in range(1, 9):
        for kernel in (1, 2, 3, 7):
            for stride in (1, 2):
                low, high = patch_conv.same_padding(size, kernel, stride)
                explicit = jax.lax.conv_general_dilated(
                    jnp.ones((1, size, 1, 1)),
                    jnp.ones((kernel, 1, 1, 1)),
                    (stride, 1),
                    [(low, high), (0, 0)],
                    dimension_numbers=DIMENSIONS,
                )
                implicit = _native(
                    jnp.ones((1, size, 1, 1)), jnp.ones((kernel, 1, 1, 1)), stride, "SAME"
                )
                np.testing.assert_array_equal(explicit, implicit)


def _torso(images: jax.Array, is_training: bool) -> jax.Array:
    with networks.init_scheme("torchvision"):
        return networks.ResNetTorso(10)(images, is_training)


def test_torso_on_the_patch_path_has_haikus_parameters_outputs_and_gradients(monkeypatch):
    forward = hk.transform_with_state(_torso)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 64, 64, 3))

    @jax.jit
    def run():
        params, state = forward.init(jax.random.PRNGKey(0), images, is_training=True)

        def loss(p):
            out, _ = forward.apply(p, state, None, images, is_training=True)
            return jnp.mean(jnp.square(out)), out

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return params, out, grads

    calls = []
    original = patch_conv.patch_conv
    monkeypatch.setattr(
        patch_conv, "patch_conv", lambda *a: calls.append(a[0].shape) or original(*a)
    )
    patched = run()
    # Stem, two 3x3 convs per group, and the projection shortcuts of groups 1-3, traced for
    # init and for apply.
    assert len(calls) == 2 * (1 + 4 * 2 + 3)
    monkeypatch.setattr(patch_conv, "use_patch_conv", lambda *a: False)
    calls.clear()
    native = run()
    assert not calls
    # Same names, shapes and initial values (the init scheme still reaches every conv).
    jax.tree_util.tree_map(np.testing.assert_array_equal, patched[0], native[0])
    np.testing.assert_allclose(patched[1], native[1], rtol=1e-4, atol=1e-4)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), patched[2], native[2]
    )


def test_only_plain_convs_traced_for_cpu_take_the_patch_path():
    x = jnp.ones((1, 4, 4, 2))

    def decisions(_):
        plain = hk.Conv2D(4, 3, name="plain")
        dilated = hk.Conv2D(4, 3, rate=2, name="dilated")
        grouped = hk.Conv2D(4, 3, feature_group_count=2, name="grouped")
        channels_first = hk.Conv2D(4, 3, data_format="NCHW", name="channels_first")
        return {
            "cpu": patch_conv.use_patch_conv(plain, x, "cpu"),
            "gpu": patch_conv.use_patch_conv(plain, x, "gpu"),
            "tpu": patch_conv.use_patch_conv(plain, x, "tpu"),
            "dilated": patch_conv.use_patch_conv(dilated, x, "cpu"),
            "grouped": patch_conv.use_patch_conv(grouped, x, "cpu"),
            "channels_first": patch_conv.use_patch_conv(channels_first, x, "cpu"),
            "linear": patch_conv.use_patch_conv(hk.Linear(3), x, "cpu"),
        }

    got = hk.transform(decisions).apply({}, None, x)
    assert got == {
        "cpu": True,
        "gpu": False,
        "tpu": False,
        "dilated": False,
        "grouped": False,
        "channels_first": False,
        "linear": False,
    }
