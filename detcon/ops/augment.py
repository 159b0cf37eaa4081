"""On-device view augmentations with the BYOL presets: colour jitter, grayscale, blur, solarize.

Spatial augmentations (crop, flip) happen in `detcon/data` jointly with the masks; everything here
is colour/filtering only, so the masks stay aligned with the image.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import chex
import dm_pix
import jax
import jax.numpy as jnp

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

SOLARIZE_THRESHOLD = 0.5
# dm_pix: DetCon/BYOL's ops (additive brightness, per-channel-mean contrast, HSV saturation);
# torchvision: ColorJitter's (brightness x factor, contrast and saturation blended with the
# grey mean / grey image); both apply the four ops in a random order and shift hue in HSV.
JITTER_STYLES = ("dm_pix", "torchvision")
# zero: BYOL/SimCLR's 'SAME' convolution (taps past the edge are zeros, darkening the border);
# edge: PIL's GaussianBlur under MoCo/DenseCL (the edge pixel is repeated outwards).
BLUR_PADDINGS = ("zero", "edge")
# `AugmentParams.jitter_order` holds a permutation of indices into this tuple.
JITTER_OPS: tuple[str, ...] = ("brightness", "contrast", "saturation", "hue")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Strengths and probabilities of one view; frozen, hence hashable (a valid static jit arg)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float
    solarize_prob: float
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    jitter_style: str = "dm_pix"  # one of JITTER_STYLES
    blur_padding: str = "zero"  # one of BLUR_PADDINGS

    def __post_init__(self):
        if self.jitter_style not in JITTER_STYLES:
            raise ValueError(f"jitter_style={self.jitter_style!r}: choose one of {JITTER_STYLES}.")
        if self.blur_padding not in BLUR_PADDINGS:
            raise ValueError(f"blur_padding={self.blur_padding!r}: choose one of {BLUR_PADDINGS}.")
        for name in ("color_jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        for name in JITTER_OPS:
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} strength must be >= 0, got {getattr(self, name)}.")
        if self.hue > 0.5:
            raise ValueError(f"hue must be <= 0.5 (a half turn), got {self.hue}.")
        sigma_min, sigma_max = self.blur_sigma
        if not 0.0 < sigma_min <= sigma_max:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}.")


VIEW1 = AugmentConfig(blur_prob=1.0, solarize_prob=0.0)
VIEW2 = AugmentConfig(blur_prob=0.1, solarize_prob=0.2)
# SimCLR v1 (google-research/simclr data_util.py, colour-jitter strength 1.0): both views
# alike, jitter 0.8/0.8/0.8/0.2 with p 0.8, grayscale 0.2, blur p 0.5, no solarisation.
SIMCLR_VIEW = AugmentConfig(
    brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur_prob=0.5, solarize_prob=0.0
)
# MoCo v2 (facebookresearch/moco main_moco.py --aug-plus; also DenseCL's and DetCo's pipelines):
# both views alike, torchvision ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, RandomGrayscale 0.2,
# PIL GaussianBlur(radius=sigma) p 0.5 with extended edges (moco/loader.py), no solarisation.
MOCO_V2_VIEW = AugmentConfig(
    brightness=0.4,
    contrast=0.4,
    saturation=0.4,
    hue=0.1,
    blur_prob=0.5,
    solarize_prob=0.0,
    jitter_style="torchvision",
    blur_padding="edge",
)


class AugmentParams(NamedTuple):
    """Every random draw for one image: scalars but `jitter_order` [4]; vmap adds a leading [B]."""

    apply_jitter: jax.Array  # bool
    jitter_order: jax.Array  # int32 [4], a permutation of range(len(JITTER_OPS))
    brightness_delta: jax.Array  # dm_pix: the added delta; torchvision: the multiplying factor
    contrast_factor: jax.Array
    saturation_factor: jax.Array
    hue_delta: jax.Array
    apply_grayscale: jax.Array  # bool
    apply_blur: jax.Array  # bool
    blur_sigma: jax.Array
    apply_solarize: jax.Array  # bool


def blur_kernel_size(height: int, width: int) -> int:
    """Odd Gaussian kernel size, about a tenth of the shorter side (23 for 224), at least 3."""
    radius = max(1, int(0.1 * min(height, width)) // 2)
    return 2 * radius + 1


def sample_params(key: jax.Array, config: AugmentConfig) -> AugmentParams:
    """All random draws for one image from one key (scalars; `jitter_order` is [4])."""
    # One threefry call for everything: far cheaper to compile than a split plus one call per draw.
    # Slots 0-8 are the scalar draws below; the last len(JITTER_OPS) rank into the jitter order.
    uniforms = jax.random.uniform(key, (9 + len(JITTER_OPS),))

    def coin(index: int, prob: float) -> jax.Array:
        # uniform is in [0, 1), so prob 1.0 always fires and prob 0.0 never does.
        return uniforms[index] < prob

    def between(index: int, low: float, high: float) -> jax.Array:
        return low + (high - low) * uniforms[index]

    def around_one(index: int, strength: float) -> jax.Array:
        return between(index, max(0.0, 1.0 - strength), 1.0 + strength)

    return AugmentParams(
        apply_jitter=coin(0, config.color_jitter_prob),
        # Ranks of i.i.d. uniforms form a uniformly random permutation (ties have ~1e-6 chance and
        # still yield a permutation); cheaper than jax.random.permutation's repeated key sorts.
        jitter_order=jnp.argsort(uniforms[9:]).astype(jnp.int32),
        brightness_delta=(
            around_one(1, config.brightness)
            if config.jitter_style == "torchvision"
            else between(1, -config.brightness, config.brightness)
        ),
        contrast_factor=around_one(2, config.contrast),
        saturation_factor=around_one(3, config.saturation),
        hue_delta=between(4, -config.hue, config.hue),
        apply_grayscale=coin(5, config.grayscale_prob),
        apply_blur=coin(6, config.blur_prob),
        blur_sigma=between(7, *config.blur_sigma),
        apply_solarize=coin(8, config.solarize_prob),
    )


def _identity(image: jax.Array) -> jax.Array:
    """The untaken side of a `lax.cond`: [H, W, 3] -> [H, W, 3]."""
    return image


def adjust_hsv(image: jax.Array, saturation_factor: jax.Array, hue_delta: jax.Array) -> jax.Array:
    """Scales saturation (clipped to [0, 1]) and rotates hue in one HSV round trip: [H, W, 3]."""
    # Same maths as dm_pix.adjust_saturation followed by dm_pix.adjust_hue, with one conversion.
    hue, saturation, value = jnp.moveaxis(dm_pix.rgb_to_hsv(image), -1, 0)
    saturation = jnp.clip(saturation * saturation_factor, 0.0, 1.0)
    # hsv_to_rgb wraps the hue modulo 1, so a negative delta needs no extra care.
    return dm_pix.hsv_to_rgb(jnp.stack([hue + hue_delta, saturation, value], axis=-1))


def grey(image: jax.Array) -> jax.Array:
    """torchvision's rgb_to_grayscale (0.2989 R + 0.587 G + 0.114 B): [H, W, 3] -> [H, W, 1]."""
    return dm_pix.rgb_to_grayscale(image, keep_dims=True)


def blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
    """torchvision's _blend: factor * image + (1 - factor) * other, clipped to [0, 1]."""
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def color_jitter(image: jax.Array, params: AugmentParams, config: AugmentConfig) -> jax.Array:
    """Brightness, contrast, saturation, hue in `params.jitter_order`, each clipped: [H, W, 3]."""
    strengths = (config.brightness, config.contrast, config.saturation, config.hue)
    if not any(strength > 0 for strength in strengths):
        return image
    saturation_op, hue_op = JITTER_OPS.index("saturation"), JITTER_OPS.index("hue")

    def keep(x: jax.Array, op: jax.Array) -> jax.Array:
        return x

    torchvision = config.jitter_style == "torchvision"

    def shift_brightness(x: jax.Array, op: jax.Array) -> jax.Array:
        if torchvision:  # F.adjust_brightness: blend with black, i.e. x * factor
            return blend(x, jnp.zeros_like(x), params.brightness_delta)
        # Additive, as dm_pix.random_brightness in the DetCon and BYOL releases.
        return jnp.clip(dm_pix.adjust_brightness(x, params.brightness_delta), 0.0, 1.0)

    def scale_contrast(x: jax.Array, op: jax.Array) -> jax.Array:
        if torchvision:  # F.adjust_contrast: blend with the mean of the grey image
            return blend(x, jnp.mean(grey(x)), params.contrast_factor)
        # Per-channel spatial mean, as tf.image/BYOL.
        return jnp.clip(dm_pix.adjust_contrast(x, params.contrast_factor), 0.0, 1.0)

    def torchvision_saturation_or_hue(x: jax.Array, op: jax.Array) -> jax.Array:
        # F.adjust_saturation blends with the grey image; F.adjust_hue rotates hue in HSV.
        return jax.lax.cond(
            op == saturation_op,
            lambda y: blend(y, grey(y), params.saturation_factor),
            lambda y: jnp.clip(adjust_hsv(y, jnp.float32(1.0), params.hue_delta), 0.0, 1.0),
            x,
        )

    def saturation_or_hue(x: jax.Array, op: jax.Array) -> jax.Array:
        if torchvision:
            return torchvision_saturation_or_hue(x, op)
        # Factor 1 / delta 0 leave the other HSV coordinate exactly unchanged.
        factor = jnp.where(op == saturation_op, params.saturation_factor, 1.0)
        delta = jnp.where(op == hue_op, params.hue_delta, 0.0)
        return jnp.clip(adjust_hsv(x, factor, delta), 0.0, 1.0)

    # Under vmap the per-example index turns each switch into a select that runs every branch;
    # sharing one HSV round trip between saturation and hue halves the dominant cost (about 30%
    # faster jitter on CPU). A zero-strength op maps statically to `keep`, which keeps the other
    # ops bit-exact (an HSV round trip is not) and saves work.
    branch_of_op = jnp.array(
        [branch if strength > 0 else 0 for branch, strength in zip((1, 2, 3, 3), strengths)],
        jnp.int32,
    )
    branches = (keep, shift_brightness, scale_contrast, saturation_or_hue)
    for step in range(len(JITTER_OPS)):
        op = params.jitter_order[step]
        image = jax.lax.switch(branch_of_op[op], branches, image, op)
    return image


def _blur_matrix(size: int, sigma: jax.Array, kernel_size: int, padded: bool = False) -> jax.Array:
    """[size, size] banded matrix: row i holds the normalised Gaussian taps centred on pixel i;
    padded: [size, size + kernel_size - 1], the same taps on an input padded by the radius."""
    radius = kernel_size // 2
    columns = size + 2 * radius if padded else size
    offset = jnp.arange(columns)[None, :] - jnp.arange(size)[:, None] - (radius if padded else 0)
    taps = jnp.exp(-jnp.square(offset.astype(jnp.float32)) / (2.0 * jnp.square(sigma)))
    norm = jnp.sum(
        jnp.exp(
            -jnp.square(jnp.arange(-radius, radius + 1, dtype=jnp.float32))
            / (2.0 * jnp.square(sigma))
        )
    )
    # Taps past the image edge are simply absent: the same as dm_pix's zero 'SAME' padding.
    return jnp.where(jnp.abs(offset) <= radius, taps, 0.0) / norm


def gaussian_blur(
    image: jax.Array, sigma: jax.Array, kernel_size: int, padding: str = "zero"
) -> jax.Array:
    """dm_pix.gaussian_blur's result ([H, W, C], zero 'SAME' padding) as two matmuls; padding
    "edge" repeats the border pixels outwards instead (PIL's GaussianBlur, scipy's 'nearest').

    Under vmap dm_pix's per-image kernels become a grouped convolution that took 11% of the
    ResNet-50 step on an H200; banded matmuls run on the tensor cores instead.
    """
    height, width = image.shape[0], image.shape[1]
    padded = padding == "edge"
    if padded:
        radius = kernel_size // 2
        image = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = _blur_matrix(height, sigma, kernel_size, padded)
    cols = _blur_matrix(width, sigma, kernel_size, padded)
    return jnp.einsum("yi,ixc,xj->yjc", rows, image, cols.T)


def pil_blur_kernel_size(sigma_max: float) -> int:
    """Odd taps covering +-3 sigma_max (PIL's three box passes reach about 2.6 sigma), >= 3."""
    return 2 * max(1, math.ceil(3.0 * sigma_max)) + 1


def apply_params(image: jax.Array, params: AugmentParams, config: AugmentConfig) -> jax.Array:
    """Applies pre-drawn augmentations to one image: [H, W, 3] in [0, 1] -> [H, W, 3] in [0, 1]."""
    # Ops whose probability is statically 0 are left out of the graph entirely (solarize in view 1).
    if config.color_jitter_prob > 0:
        image = jax.lax.cond(
            params.apply_jitter,
            functools.partial(color_jitter, params=params, config=config),
            _identity,
            image,
        )
    if config.grayscale_prob > 0:
        gray = dm_pix.rgb_to_grayscale(image, keep_dims=True)
        image = jnp.where(params.apply_grayscale, gray, image)
    if config.blur_prob > 0:
        if config.blur_padding == "edge":  # PIL: a kernel in pixels, whatever the image size
            kernel_size = pil_blur_kernel_size(config.blur_sigma[1])
        else:
            kernel_size = blur_kernel_size(image.shape[0], image.shape[1])
        # Zero ('SAME') padding darkens a thin border, as in BYOL's own blur; PIL extends edges.
        image = jax.lax.cond(
            params.apply_blur,
            lambda x: gaussian_blur(x, params.blur_sigma, kernel_size, config.blur_padding),
            _identity,
            image,
        )
    if config.solarize_prob > 0:
        image = jnp.where(params.apply_solarize, dm_pix.solarize(image, SOLARIZE_THRESHOLD), image)
    return jnp.clip(image, 0.0, 1.0)


def augment_image(key: jax.Array, image: jax.Array, config: AugmentConfig) -> jax.Array:
    """One random view of one image: [H, W, 3] float32 in [0, 1] -> [H, W, 3] clipped to [0, 1]."""
    chex.assert_rank(image, 3)
    # The float32 draws would promote a lower-precision image and break lax.cond's dtype match.
    chex.assert_type(image, jnp.float32)
    chex.assert_axis_dimension(image, -1, 3)
    return apply_params(image, sample_params(key, config), config)


def augment_batch(keys: jax.Array, images: jax.Array, config: AugmentConfig) -> jax.Array:
    """One random view per example, each from its own key: keys [B], images [B, H, W, 3] -> same."""
    chex.assert_rank(images, 4)
    if keys.shape[0] != images.shape[0]:
        raise ValueError(f"Need one key per image: {keys.shape[0]} keys, {images.shape[0]} images.")
    return jax.vmap(functools.partial(augment_image, config=config))(keys, images)


def normalize(images: jax.Array) -> jax.Array:
    """ImageNet mean/std standardisation over the last (channel) axis: [..., 3] -> [..., 3]."""
    mean = jnp.asarray(IMAGENET_MEAN, images.dtype)
    std = jnp.asarray(IMAGENET_STD, images.dtype)
    return (images - mean) / std
