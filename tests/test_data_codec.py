"""Input bytes -> RGB JPEG: what is kept, what is converted (to which colours), what is refused."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from detcon.data import image_codec


def _encoded(image: Image.Image, **save_options) -> bytes:
    out = io.BytesIO()
    image.save(out, **save_options)
    return out.getvalue()


def _gradient(height: int = 24, width: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 8, y * 10, 255 - x * 8], axis=-1).astype(np.uint8)


def test_rgb_jpeg_bytes_are_kept_and_pixels_are_tensorflows_decode():
    data = _encoded(Image.fromarray(_gradient()), format="JPEG", quality=80)
    jpeg, pixels = image_codec.to_rgb_jpeg(data)
    assert jpeg == data
    np.testing.assert_array_equal(pixels, tf.io.decode_jpeg(data, channels=3).numpy())


def test_png_cmyk_and_grey_become_rgb_jpeg_with_the_same_colours():
    rgb = _gradient()
    inputs = {
        "png": _encoded(Image.fromarray(rgb), format="PNG"),
        "cmyk": _encoded(Image.fromarray(rgb).convert("CMYK"), format="JPEG", quality=95),
    }
    for name, data in inputs.items():
        jpeg, pixels = image_codec.to_rgb_jpeg(data)
        assert jpeg[:4] == b"\xff\xd8\xff\xe0", name  # JFIF, as the official reader expects
        np.testing.assert_array_equal(pixels, tf.io.decode_jpeg(jpeg, channels=3).numpy())
        assert np.abs(pixels.astype(int) - rgb).mean() < 6, name
    grey = _encoded(Image.fromarray(rgb[..., 0]), format="JPEG", quality=95)
    _, pixels = image_codec.to_rgb_jpeg(grey)
    assert (
        pixels.shape == (24, 32, 3) and np.abs(pixels[..., 0].astype(int) - rgb[..., 0]).mean() < 4
    )
    assert np.array_equal(pixels[..., 0], pixels[..., 1])


def test_transparent_pixels_become_white_and_16_bit_is_scaled():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 8:, 3] = 255  # left half fully transparent
    _, pixels = image_codec.to_rgb_jpeg(_encoded(Image.fromarray(rgba), format="PNG"))
    assert pixels[:, :6].min() > 245  # white where transparent, not the hidden red
    assert abs(int(pixels[:, 10:, 0].mean()) - 200) < 6 and pixels[:, 10:, 1].mean() < 10
    deep = np.full((8, 8), 32896, np.uint16)  # 128 * 257
    _, pixels = image_codec.to_rgb_jpeg(_encoded(Image.fromarray(deep), format="PNG"))
    assert abs(float(pixels.mean()) - 128) < 2


def test_broken_inputs_are_refused_with_a_reason():
    data = _encoded(Image.fromarray(_gradient(64, 64)), format="JPEG")
    with pytest.raises(image_codec.BadImageError, match="truncated"):
        image_codec.to_rgb_jpeg(data[: len(data) // 2])
    with pytest.raises(image_codec.BadImageError, match="not an image format"):
        image_codec.to_rgb_jpeg(b"hello, I am a text file\n")


def test_full_chroma_jpeg_keeps_colour_edges_that_subsampling_smears():
    # One-pixel red/green columns: 4:2:0 averages neighbouring colours, 4:4:4 keeps each column.
    columns = np.zeros((16, 16, 3), np.uint8)
    columns[:, 0::2, 0] = 255
    columns[:, 1::2, 1] = 255
    halved = image_codec.encode_jpeg(columns)
    full = image_codec.encode_jpeg(columns, full_chroma=True)
    assert Image.open(io.BytesIO(halved)).layer[0][1:3] == (2, 2)
    assert Image.open(io.BytesIO(full)).layer[0][1:3] == (1, 1)
    error_halved = np.abs(image_codec.decode_rgb(halved).numpy() - columns.astype(float)).mean()
    error_full = np.abs(image_codec.decode_rgb(full).numpy() - columns.astype(float)).mean()
    assert error_full < 10 < error_halved
