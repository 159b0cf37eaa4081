"""Image bytes in any format Pillow or TensorFlow reads -> RGB JPEG bytes, and their decoded pixels.

`decode_rgb` is the one decoder of stored bytes: the mask writer runs FH on its output and the
training pipeline crops its output, so masks and pixels line up exactly.  It matters: TensorFlow's
default JPEG decoder (INTEGER_FAST DCT) differs from Pillow's by up to ~15 grey levels.
"""

import io

import numpy as np
import tensorflow as tf
from PIL import Image, UnidentifiedImageError

JPEG_QUALITY = 95  # for re-encoded inputs only; 3-channel JPEGs are stored byte for byte
_WHITE = (255, 255, 255)


class BadImageError(ValueError):
    """An input file that is not a decodable image; the message says why."""


def decode_rgb(encoded: tf.Tensor | bytes) -> tf.Tensor:
    """Returns uint8 `[H, W, 3]` pixels of encoded image bytes, decoded exactly as in training."""
    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def _tf_decode(data: bytes) -> np.ndarray | None:
    try:
        return decode_rgb(data).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        return None


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Returns uint8 `[H, W, 3]` for a loaded Pillow image of any mode (alpha over white)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F" and values.max() > 255:
            values = values / 257.0  # 16-bit range to 8-bit
        elif image.mode == "F" and values.max() <= 1.0:
            values = values * 255.0
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        # Transparent pixels hold arbitrary colours; compositing shows what a viewer shows.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def encode_jpeg(pixels: np.ndarray, full_chroma: bool = False) -> bytes:
    """Returns JFIF JPEG bytes of uint8 `[H, W, 3]` pixels (`full_chroma`: 4:4:4, else 4:2:0)."""
    out = io.BytesIO()
    # Pillow's default, 4:2:0, halves colour resolution; 4:4:4 keeps it for tiny images.
    subsampling = 0 if full_chroma else -1
    Image.fromarray(pixels).save(out, format="JPEG", quality=JPEG_QUALITY, subsampling=subsampling)
    return out.getvalue()


def _pillow_rgb(image: Image.Image, data: bytes) -> tuple[np.ndarray, bool]:
    """Returns (uint8 `[H, W, 3]`, whether `data` can be stored as is) for an opened image."""
    # MPO is a camera JPEG with extra preview frames; its first frame is a plain JPEG stream.
    if image.format in ("JPEG", "MPO") and image.mode == "RGB":
        pixels = _tf_decode(data)
        if pixels is not None:
            return pixels, True
    try:
        image.load()
        return _to_rgb_array(image), False
    except Image.DecompressionBombError as error:
        raise BadImageError(f"too large: {error}") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise BadImageError(f"corrupt or truncated {image.format} data: {error}") from None


def to_rgb_jpeg(data: bytes) -> tuple[bytes, np.ndarray]:
    """Returns (RGB JPEG bytes, their `decode_rgb` pixels `[H, W, 3]`); raises BadImageError."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        image = None
    except (OSError, ValueError, SyntaxError) as error:
        raise BadImageError(f"unreadable image header: {error}") from None
    if image is None:
        rgb = _tf_decode(data)  # a format TensorFlow reads but Pillow does not
        if rgb is None:
            raise BadImageError("not an image format Pillow or TensorFlow recognises")
    else:
        with image:
            rgb, keep_bytes = _pillow_rgb(image, data)
        if keep_bytes:
            # Already what the schema asks for: store the bytes as they are (no second lossy pass).
            return data, rgb
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise BadImageError(f"empty image of shape {rgb.shape}")
    jpeg = encode_jpeg(np.ascontiguousarray(rgb))
    pixels = _tf_decode(jpeg)
    if pixels is None:  # cannot happen for bytes we just encoded; fail loudly if it ever does
        raise RuntimeError("TensorFlow could not decode a JPEG written by Pillow")
    return jpeg, pixels
