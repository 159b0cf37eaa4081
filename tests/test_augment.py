"""Tests for detcon.ops.augment: ranges, each op's formula, BYOL frequencies, batching, tracing."""

import dataclasses
import functools

import chex
import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from detcon.ops import augment

# Every op off; each test switches on exactly what it checks.
ALL_OFF = augment.AugmentConfig(
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    hue=0.0,
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=0.0,
    solarize_prob=0.0,
)


def _only(**overrides) -> augment.AugmentConfig:
    return dataclasses.replace(ALL_OFF, **overrides)


def _random_images(seed: int, batch: int, size: int, low: float = 0.0, high: float = 1.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.uniform(low, high, (batch, size, size, 3)), jnp.float32)


def _keys(n: int, seed: int = 0) -> jax.Array:
    # Per-example keys the way the trainer derives them: fold the global example index in.
    return jax.vmap(functools.partial(jax.random.fold_in, jax.random.PRNGKey(seed)))(jnp.arange(n))


@functools.partial(jax.jit, static_argnames="config")
def _run(keys, images, config):
    """Augmented batch and the draws behind it, in one compiled program per (config, shape)."""
    draws = jax.vmap(augment.sample_params, in_axes=(0, None))(keys, config)
    return augment.augment_batch(keys, images, config), draws


def test_presets_match_byol_and_config_is_validated():
    assert (augment.VIEW1.blur_prob, augment.VIEW1.solarize_prob) == (1.0, 0.0)
    assert (augment.VIEW2.blur_prob, augment.VIEW2.solarize_prob) == (0.1, 0.2)
    for view in (augment.VIEW1, augment.VIEW2):
        assert (view.brightness, view.contrast, view.saturation, view.hue) == (0.4, 0.4, 0.2, 0.1)
        assert (view.color_jitter_prob, view.grayscale_prob) == (0.8, 0.2)
        assert view.blur_sigma == (0.1, 2.0)
    with pytest.raises(ValueError, match="blur_prob"):
        augment.AugmentConfig(blur_prob=1.5, solarize_prob=0.0)
    with pytest.raises(ValueError, match="blur_sigma"):
        augment.AugmentConfig(blur_prob=1.0, solarize_prob=0.0, blur_sigma=(2.0, 1.0))


@pytest.mark.parametrize("view", [augment.VIEW1, augment.VIEW2], ids=["view1", "view2"])
def test_range_shape_dtype_and_key_determinism(view):
    images = _random_images(0, 4, 32)
    out, _ = _run(_keys(4), images, view)
    assert out.shape == images.shape and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    np.testing.assert_array_equal(out, _run(_keys(4), images, view)[0])
    other, _ = _run(_keys(4, seed=1), images, view)
    # Every example must change with its key, not just the batch as a whole.
    assert np.all(np.abs(np.asarray(out - other)).reshape(4, -1).max(axis=1) > 1e-3)


def test_grayscale_only_gives_equal_channels_with_rec601_luma():
    images = _random_images(1, 2, 8)
    out, _ = _run(_keys(2), images, _only(grayscale_prob=1.0))
    luma = images @ jnp.array([0.2989, 0.5870, 0.1140])
    for channel in range(3):
        np.testing.assert_allclose(out[..., channel], luma, atol=1e-6)


def test_solarize_only_inverts_values_at_or_above_half():
    images = _random_images(2, 2, 8).at[0, 0, 0].set(jnp.array([0.5, 0.49999, 1.0]))
    out, _ = _run(_keys(2), images, _only(solarize_prob=1.0))
    np.testing.assert_array_equal(out, np.where(images < 0.5, images, 1.0 - images))
    np.testing.assert_array_equal(out[0, 0, 0], np.array([0.5, 0.49999, 0.0], np.float32))


def test_blur_kernel_size_is_odd_tenth_of_image():
    assert augment.blur_kernel_size(224, 224) == 23
    assert augment.blur_kernel_size(64, 96) == 7
    assert augment.blur_kernel_size(8, 8) == 3


def test_blur_only_with_fixed_sigma_matches_hand_convolution_of_a_delta():
    size, sigma = 64, 1.5  # kernel 7, radius 3
    image = jnp.zeros((1, size, size, 3)).at[0, 32, 20].set(jnp.array([1.0, 0.5, 0.25]))
    out, _ = _run(_keys(1), image, _only(blur_prob=1.0, blur_sigma=(sigma, sigma)))
    out = np.asarray(out)[0]
    offsets = np.arange(-3, 4)
    weights = np.exp(-(offsets**2) / (2 * sigma**2))
    weights /= weights.sum()
    expected = np.zeros((size, size, 3))
    expected[29:36, 17:24] = np.outer(weights, weights)[..., None] * np.array([1.0, 0.5, 0.25])
    np.testing.assert_allclose(out, expected, atol=1e-7)
    np.testing.assert_allclose(out.sum(axis=(0, 1)), [1.0, 0.5, 0.25], rtol=1e-5)
    patch = out[29:36, 17:24]
    np.testing.assert_allclose(patch, patch[::-1], atol=1e-8)
    np.testing.assert_allclose(patch, patch.transpose(1, 0, 2), atol=1e-8)


def test_brightness_only_adds_one_constant_shift_per_image():
    # Values in [0.4, 0.6] never clip under a shift of at most 0.4: out - image is the delta.
    keys, images = _keys(32), _random_images(3, 32, 8, low=0.4, high=0.6)
    out, draws = _run(keys, images, _only(brightness=0.4, color_jitter_prob=1.0))
    shift = np.asarray(out, np.float64) - np.asarray(images, np.float64)
    per_image = shift.reshape(len(shift), -1)
    np.testing.assert_allclose(per_image, per_image[:, :1] * np.ones_like(per_image), atol=1e-6)
    np.testing.assert_allclose(per_image[:, 0], draws.brightness_delta, atol=1e-6)
    deltas = np.asarray(draws.brightness_delta)
    assert deltas.min() >= -0.4 and deltas.max() <= 0.4
    assert deltas.min() < -0.2 and deltas.max() > 0.2  # both signs, spread over the range
    # Over the full range the shifted values clip to [0, 1].
    keys, images = _keys(16), _random_images(4, 16, 8)
    out, draws = _run(keys, images, _only(brightness=0.4, color_jitter_prob=1.0))
    expected = np.clip(
        np.asarray(images) + np.asarray(draws.brightness_delta)[:, None, None, None], 0.0, 1.0
    )
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_contrast_only_scales_deviation_about_each_channel_mean():
    # Values near 0.5 so a factor <= 1.4 never clips and the formula holds exactly.
    keys, images = _keys(8), _random_images(4, 8, 8, low=0.4, high=0.6)
    out, draws = _run(keys, images, _only(contrast=0.4, color_jitter_prob=1.0))
    factors = draws.contrast_factor[:, None, None, None]
    mean = images.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out, factors * (images - mean) + mean, atol=1e-6)
    np.testing.assert_allclose(out.mean(axis=(1, 2), keepdims=True), mean, atol=1e-6)


@pytest.mark.parametrize("op", ["saturation", "hue"])
def test_saturation_and_hue_only_match_dm_pix(op):
    keys, colour = _keys(8), _random_images(5, 8, 8)
    config = _only(color_jitter_prob=1.0, **{op: getattr(augment.VIEW2, op)})
    out, draws = _run(keys, colour, config)
    if op == "saturation":
        expected = jax.jit(jax.vmap(dm_pix.adjust_saturation))(colour, draws.saturation_factor)
    else:
        expected = jax.jit(jax.vmap(dm_pix.adjust_hue))(colour, draws.hue_delta)
    np.testing.assert_allclose(out, jnp.clip(expected, 0.0, 1.0), atol=1e-5)
    # Both keep the HSV value (the max channel) and must visibly change a colour image.
    np.testing.assert_allclose(out.max(axis=-1), colour.max(axis=-1), atol=1e-6)
    assert float(jnp.abs(out - colour).max()) > 0.02


def test_color_jitter_composes_dm_pix_ops_in_the_drawn_order():
    params = augment.sample_params(jax.random.PRNGKey(0), augment.VIEW2)._replace(
        brightness_delta=jnp.float32(0.4),
        contrast_factor=jnp.float32(0.6),
        saturation_factor=jnp.float32(0.8),
        hue_delta=jnp.float32(0.1),
    )
    reference_ops = (
        lambda x: x + params.brightness_delta,
        lambda x: dm_pix.adjust_contrast(x, params.contrast_factor),
        lambda x: dm_pix.adjust_saturation(x, params.saturation_factor),
        lambda x: dm_pix.adjust_hue(x, params.hue_delta),
    )
    orders = (jnp.array([0, 1, 2, 3]), jnp.array([3, 2, 1, 0]), jnp.array([2, 0, 3, 1]))

    @jax.jit
    def jitter_and_reference(image):
        results = []
        for order in orders:
            reference = image
            for op in order.tolist():
                reference = jnp.clip(reference_ops[op](reference), 0.0, 1.0)
            results.append(
                (
                    augment.color_jitter(image, params._replace(jitter_order=order), augment.VIEW2),
                    reference,
                )
            )
        return results

    results = jitter_and_reference(_random_images(6, 1, 8)[0])
    for jittered, reference in results:
        np.testing.assert_allclose(jittered, reference, atol=1e-5)
    # Brightness +0.4 clips before or after contrast x0.6 pulls values to the mean: must differ.
    assert float(jnp.abs(results[0][0] - results[1][0]).max()) > 0.05


def test_view_frequencies_match_byol_probabilities():
    n = 400
    keys = _keys(n, seed=3)
    colour = jnp.broadcast_to(_random_images(8, 1, 8), (n, 8, 8, 3))
    out, draws = _run(keys, colour, augment.VIEW2)
    is_gray = np.all(np.abs(np.asarray(out) - np.asarray(out)[..., :1]) < 1e-6, axis=(1, 2, 3))
    # A white image jitters/grays to >= 0.6 everywhere (blur only darkens the border ring), so
    # an interior pixel below 0.5 means it was solarized.
    white_out, _ = _run(keys, jnp.ones((n, 8, 8, 3)), augment.VIEW2)
    is_solarized = np.asarray(white_out)[:, 4, 4, 0] < 0.5
    np.testing.assert_array_equal(is_gray, draws.apply_grayscale)
    np.testing.assert_array_equal(is_solarized, draws.apply_solarize)
    assert abs(is_gray.mean() - 0.2) < 0.07
    assert abs(is_solarized.mean() - 0.2) < 0.07
    assert abs(float(draws.apply_jitter.mean()) - 0.8) < 0.07
    assert abs(float(draws.apply_blur.mean()) - 0.1) < 0.07
    sigma = np.asarray(draws.blur_sigma)
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and sigma.max() - sigma.min() > 1.5

    order = np.asarray(draws.jitter_order)
    np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (n, 1)))
    np.testing.assert_allclose(np.bincount(order[:, 0], minlength=4) / n, 0.25, atol=0.07)

    view1 = jax.jit(jax.vmap(functools.partial(augment.sample_params, config=augment.VIEW1)))(keys)
    assert bool(view1.apply_blur.all()) and not bool(view1.apply_solarize.any())


def test_augment_image_is_apply_params_of_sample_params():
    key, image = jax.random.PRNGKey(7), _random_images(7, 1, 16)[0]
    params = augment.sample_params(key, augment.VIEW2)._replace(
        apply_jitter=jnp.array(True),
        apply_grayscale=jnp.array(False),
        apply_blur=jnp.array(True),
        apply_solarize=jnp.array(True),
    )

    @jax.jit
    def by_hand_and_by_module(image, params):
        manual = augment.color_jitter(image, params, augment.VIEW2)
        manual = dm_pix.gaussian_blur(manual, params.blur_sigma, augment.blur_kernel_size(16, 16))
        manual = jnp.clip(jnp.where(manual < 0.5, manual, 1.0 - manual), 0.0, 1.0)
        return manual, augment.apply_params(image, params, augment.VIEW2)

    manual, applied = by_hand_and_by_module(image, params)
    np.testing.assert_allclose(applied, manual, atol=1e-6)
    assert float(jnp.abs(applied - image).max()) > 0.05


def test_batch_equals_per_image_and_is_invariant_to_splitting():
    keys, images = _keys(8, seed=4), _random_images(9, 8, 32)
    whole, _ = _run(keys, images, augment.VIEW2)
    single = jax.jit(augment.augment_image, static_argnames="config")
    per_image = jnp.stack([single(keys[i], images[i], config=augment.VIEW2) for i in range(8)])
    np.testing.assert_allclose(whole, per_image, atol=1e-6)
    halves = jnp.concatenate(
        [_run(keys[:4], images[:4], augment.VIEW2)[0], _run(keys[4:], images[4:], augment.VIEW2)[0]]
    )
    np.testing.assert_array_equal(whole, halves)
    # New-style typed keys with the same seed draw the same augmentation.
    typed = jax.vmap(functools.partial(jax.random.fold_in, jax.random.key(4)))(jnp.arange(8))
    np.testing.assert_array_equal(whole, _run(typed, images, augment.VIEW2)[0])
    with pytest.raises(ValueError, match="one key per image"):
        augment.augment_batch(keys[:4], images, augment.VIEW2)
    with pytest.raises(AssertionError, match="float32"):
        augment.augment_batch(keys, images.astype(jnp.bfloat16), augment.VIEW2)


def test_jit_traces_once_per_shape():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def view2(keys, images):
        return augment.augment_batch(keys, images, augment.VIEW2)

    for seed in range(3):
        view2(_keys(2, seed), _random_images(seed, 2, 8)).block_until_ready()


def test_normalize_standardises_with_imagenet_statistics():
    mean, std = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)
    images = jnp.asarray(
        np.stack([np.broadcast_to(mean, (4, 4, 3)), np.broadcast_to(mean + std, (4, 4, 3))]),
        jnp.float32,
    )
    out = augment.normalize(images)
    assert out.shape == (2, 4, 4, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[1], 1.0, atol=1e-6)
    np.testing.assert_allclose(augment.normalize(jnp.ones(3)), (1.0 - mean) / std, rtol=1e-6)


@pytest.mark.parametrize("sigma, size", [(0.1, (32, 32)), (1.3, (32, 32)), (2.0, (24, 40))])
def test_matmul_blur_equals_dm_pix(sigma, size):
    image = jax.random.uniform(jax.random.PRNGKey(3), size + (3,))
    k = augment.blur_kernel_size(*size)
    expected = dm_pix.gaussian_blur(image, sigma, k)
    np.testing.assert_allclose(
        augment.gaussian_blur(image, jnp.float32(sigma), k), expected, atol=2e-6
    )


# ------------------------------------------------------------------ torchvision / PIL recipe


def _torchvision_functional_tensor():
    """torchvision's tensor ops (F.adjust_* on tensors), or skip with the reason."""
    try:
        import torch
        from torchvision.transforms import _functional_tensor as functional_tensor
    except Exception as error:  # ImportError, or a torchvision built for another torch
        pytest.skip(f"torchvision is not usable here ({error}); ./setup.sh installs its CPU build")
    return torch, functional_tensor


TORCHVISION_JITTER = dataclasses.replace(augment.MOCO_V2_VIEW, color_jitter_prob=1.0)


@pytest.mark.parametrize(
    "op, factor",
    [("brightness", 1.3), ("brightness", 0.7), ("contrast", 1.4), ("contrast", 0.6),
     ("saturation", 1.4), ("saturation", 0.6), ("hue", 0.1), ("hue", -0.07)],
)  # fmt: skip
def test_torchvision_jitter_op_matches_torchvision_functional(op, factor):
    torch, functional_tensor = _torchvision_functional_tensor()
    image = _random_images(20, 1, 12)[0]
    config = dataclasses.replace(
        TORCHVISION_JITTER, **{o: (0.4 if o == op else 0.0) for o in augment.JITTER_OPS}
    )
    field = {"brightness": "brightness_delta", "hue": "hue_delta"}.get(op, f"{op}_factor")
    params = augment.sample_params(jax.random.PRNGKey(0), config)._replace(
        **{field: jnp.float32(factor)}
    )
    ours = jax.jit(augment.color_jitter, static_argnames="config")(image, params, config=config)
    chw = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())
    theirs = getattr(functional_tensor, f"adjust_{op}")(chw, factor).numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)
    assert float(jnp.abs(ours - image).max()) > 0.02  # the op changed the image


def test_torchvision_jitter_composes_torchvision_ops_in_the_drawn_order():
    torch, functional_tensor = _torchvision_functional_tensor()
    factors = dict(brightness=1.35, contrast=0.65, saturation=1.3, hue=0.08)
    params = augment.sample_params(jax.random.PRNGKey(0), TORCHVISION_JITTER)._replace(
        brightness_delta=jnp.float32(factors["brightness"]),
        contrast_factor=jnp.float32(factors["contrast"]),
        saturation_factor=jnp.float32(factors["saturation"]),
        hue_delta=jnp.float32(factors["hue"]),
    )
    image = _random_images(21, 1, 10)[0]
    jitter = jax.jit(augment.color_jitter, static_argnames="config")
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):
        ours = jitter(
            image, params._replace(jitter_order=jnp.array(order)), config=TORCHVISION_JITTER
        )
        theirs = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())
        for op in order:  # ColorJitter.forward: fn_idx = randperm(4), each op with its factor
            name = augment.JITTER_OPS[op]
            theirs = getattr(functional_tensor, f"adjust_{name}")(theirs, factors[name])
        np.testing.assert_allclose(ours, theirs.numpy().transpose(1, 2, 0), atol=3e-5)


def test_torchvision_jitter_draws_multiplicative_brightness():
    draws = jax.vmap(augment.sample_params, in_axes=(0, None))(_keys(2000), TORCHVISION_JITTER)
    factors = np.asarray(draws.brightness_delta)
    # ColorJitter(brightness=0.4) draws its factor uniformly from [0.6, 1.4].
    assert 0.6 <= factors.min() < 0.61 and 1.39 < factors.max() <= 1.4
    np.testing.assert_allclose(factors.mean(), 1.0, atol=0.02)
    image = jnp.full((4, 4, 3), 0.5, jnp.float32)
    config = dataclasses.replace(TORCHVISION_JITTER, contrast=0.0, saturation=0.0, hue=0.0)
    params = augment.sample_params(jax.random.PRNGKey(1), config)._replace(
        brightness_delta=jnp.float32(1.2)
    )
    np.testing.assert_allclose(augment.color_jitter(image, params, config), 0.6, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.0])
def test_edge_padded_blur_matches_scipy_nearest_mode(sigma):
    from scipy import ndimage

    image = _random_images(22, 1, 20)[0]
    kernel_size = augment.pil_blur_kernel_size(2.0)
    radius = kernel_size // 2
    ours = augment.gaussian_blur(image, jnp.float32(sigma), kernel_size, "edge")
    theirs = np.asarray(image, np.float64)
    for axis in (0, 1):  # scipy's 'nearest' repeats the edge pixel, as PIL's box passes do
        theirs = ndimage.gaussian_filter1d(
            theirs, sigma, axis=axis, mode="nearest", truncate=radius / sigma
        )
    np.testing.assert_allclose(ours, theirs, atol=2e-6)
    # A flat image stays flat up to its border with edge padding; zero padding darkens it.
    flat = jnp.full((20, 20, 3), 0.8, jnp.float32)
    np.testing.assert_allclose(
        augment.gaussian_blur(flat, jnp.float32(sigma), kernel_size, "edge"), 0.8, atol=1e-6
    )
    if sigma >= 1.0:
        zero = augment.gaussian_blur(flat, jnp.float32(sigma), kernel_size, "zero")
        assert float(zero[0, 0, 0]) < 0.7


def test_moco_preset_is_torchvisions_recipe_and_styles_are_validated():
    view = augment.MOCO_V2_VIEW
    assert (view.brightness, view.contrast, view.saturation, view.hue) == (0.4, 0.4, 0.4, 0.1)
    assert (view.jitter_style, view.blur_padding) == ("torchvision", "edge")
    assert (augment.VIEW1.jitter_style, augment.VIEW1.blur_padding) == ("dm_pix", "zero")
    with pytest.raises(ValueError, match="jitter_style"):
        dataclasses.replace(ALL_OFF, jitter_style="pil")
    with pytest.raises(ValueError, match="blur_padding"):
        dataclasses.replace(ALL_OFF, blur_padding="reflect")
