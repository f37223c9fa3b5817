"""Decoding: orientation, colour modes, and a typed error for every kind of bad input."""

import io

import numpy as np
import pytest
from PIL import Image

from delf_retrieval.corpus import images
from delf_retrieval.corpus.images import DecodeLimits


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_rgb_jpeg_decodes_to_uint8_rgb():
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = (200, 10, 10)
    out = images.decode_image(encode(Image.fromarray(arr), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
    np.testing.assert_array_equal(out, arr)


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[0, 0] = (255, 0, 0)  # a red top-left pixel as stored
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    out = images.decode_image(encode(img, "PNG", exif=exif))
    assert out.shape == (40, 20, 3)
    # After a clockwise turn the stored top-left pixel is at the top-right.
    assert tuple(out[0, -1]) == (255, 0, 0)


def test_grayscale_becomes_three_equal_channels():
    gray = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(32, 32)
    out = images.decode_image(encode(Image.fromarray(gray, "L"), "PNG"))
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out[..., 0], gray)
    np.testing.assert_array_equal(out[..., 1], gray)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    out = images.decode_image(encode(cmyk, "JPEG", quality=95))
    assert out.shape == (32, 32, 3)
    r, g, b = out[16, 16].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_transparency_is_composited_over_white():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (0, 0, 255, 255)  # opaque blue left, fully transparent right
    out = images.decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert tuple(out[5, 5]) == (0, 0, 255)
    assert tuple(out[5, 25]) == (255, 255, 255)
    palette = Image.fromarray(rgba, "RGBA").convert("P")
    out = images.decode_image(encode(palette, "PNG"))
    assert out.shape == (32, 32, 3)


def test_sixteen_bit_png_is_rescaled():
    values = np.linspace(0, 65535, 32 * 32).astype(np.uint16).reshape(32, 32)
    img = Image.fromarray(values)
    assert img.mode.startswith("I;16")
    out = images.decode_image(encode(img, "PNG"))
    expected = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_zero_byte_file():
    with pytest.raises(images.EmptyImageError) as e:
        images.decode_image(b"", name="empty.jpg")
    assert e.value.reason == "empty" and "empty.jpg" in str(e.value)


def test_garbage_is_corrupt():
    with pytest.raises(images.CorruptImageError):
        images.decode_image(b"this is not an image at all" * 10)


def test_truncated_jpeg():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)), "JPEG", quality=90)
    with pytest.raises(images.TruncatedImageError) as e:
        images.decode_image(data[: len(data) // 2])
    assert e.value.reason == "truncated"


def test_huge_image_is_refused_before_decoding():
    # A 12000 x 12000 bilevel PNG is tiny on disk but 144 MP once decoded: a decompression bomb.
    bomb = encode(Image.new("1", (12000, 12000)), "PNG")
    assert len(bomb) < 1_000_000
    with pytest.raises(images.ImageTooLargeError) as e:
        images.decode_image(bomb)
    assert e.value.reason == "too_large"
    small = encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(images.ImageTooLargeError):
        images.decode_image(small, DecodeLimits(max_pixels=1000))


def test_too_small_image():
    with pytest.raises(images.ImageTooSmallError):
        images.decode_image(encode(Image.new("RGB", (8, 100)), "PNG"))


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(images.UnreadableImageError) as e:
        images.load_image(str(tmp_path / "missing.jpg"))
    assert e.value.reason == "unreadable"


def test_all_errors_are_image_errors_with_distinct_reasons():
    kinds = [images.EmptyImageError, images.UnreadableImageError, images.CorruptImageError,
             images.TruncatedImageError, images.ImageTooLargeError, images.ImageTooSmallError]
    assert all(issubclass(k, images.ImageError) for k in kinds)
    assert len({k.reason for k in kinds}) == len(kinds)
