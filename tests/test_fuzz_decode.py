"""Decoding arbitrary bytes: seeded mutants of every format Pillow writes give an image or a typed
ImageError, quickly; only the allow-listed formats are decoded; metadata and pixels are bounded."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from delf_retrieval.corpus import images
from tests import fuzzing

PER_FILE_SECONDS = 2.0  # generous for a loaded CI machine: the slowest of 20,000 takes ~0.05 s here


def png_with_text_bomb(inflated_bytes: int = 50 << 20, chunks: int = 1) -> bytes:
    """A valid 64 x 64 PNG with ``chunks`` zTXt chunks that each inflate to ``inflated_bytes``
    (50 MB from ~50 KB on disk by default)."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    png = buffer.getvalue()
    text = b""
    for i in range(chunks):
        body = f"Comment{i}".encode() + b"\x00\x00" + zlib.compress(b"\x00" * inflated_bytes, 9)
        text += struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    ihdr_end = 8 + 25  # signature, then the IHDR chunk (length, type, 13 bytes, crc)
    return png[:ihdr_end] + text + png[ihdr_end:]


def test_mutants_of_every_format_decode_or_raise_a_typed_error():
    bases = fuzzing.encoded_bases()
    assert {label.split("-")[0] for label, _ in bases} >= set(fuzzing.DECODED)
    n = 50 * len(bases)
    assert n >= 2000
    untyped, slow, reasons = [], [], set()
    for i, (label, data) in enumerate(fuzzing.corpus(n, seed=0)):
        start = time.perf_counter()
        try:
            rgb = images.decode_image(data, name=f"{label}#{i}")
            assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, label
            reasons.add("decoded")
        except images.ImageError as e:
            reasons.add(e.reason)
        except Exception as e:  # noqa: BLE001 - what this test is looking for
            untyped.append(f"{label}#{i}: {type(e).__name__}: {e}")
        if time.perf_counter() - start > PER_FILE_SECONDS:
            slow.append(label)
    assert untyped == [], untyped[:10]
    assert slow == []
    assert {"decoded", "corrupt", "truncated", "unsupported"} <= reasons, reasons


def test_only_the_allow_listed_formats_are_decoded():
    for label, data in fuzzing.encoded_bases():
        fmt = label.split("-")[0]
        if fmt in fuzzing.DECODED or fmt == "MPO":  # MPO is JPEG with extra frames
            assert images.decode_image(data).shape[:2] == (48, 40), label
        else:
            with pytest.raises(images.ImageError) as e:
                images.decode_image(data)
            assert e.value.reason in ("unsupported", "corrupt"), label
    eps = next(d for label, d in fuzzing.encoded_bases() if label.startswith("EPS"))
    with pytest.raises(images.UnsupportedImageError, match="EPS|PostScript"):
        images.decode_image(eps)  # never handed to Ghostscript


def test_a_png_text_chunk_that_inflates_to_50_mb_is_too_large():
    bomb = png_with_text_bomb()
    assert len(bomb) < 100_000
    start = time.perf_counter()
    with pytest.raises(images.ImageTooLargeError) as e:
        images.decode_image(bomb, name="bomb.png")
    assert e.value.reason == "too_large" and "bomb.png" in str(e.value)
    assert time.perf_counter() - start < PER_FILE_SECONDS
    # Text chunks within the bound are fine.
    assert images.decode_image(png_with_text_bomb(100_000)).shape == (64, 64, 3)


def test_metadata_is_bounded_per_chunk_and_in_all():
    assert images.decode_image(png_with_text_bomb(900_000)).shape == (64, 64, 3)
    with pytest.raises(images.ImageTooLargeError, match="metadata"):
        images.decode_image(png_with_text_bomb(2 << 20))  # one chunk over 1 MB
    with pytest.raises(images.ImageTooLargeError, match="metadata"):
        images.decode_image(png_with_text_bomb(900_000, chunks=10))  # 9 MB of text in all, over 8 MB


def test_a_decoder_bug_on_hostile_bytes_is_a_corrupt_file(monkeypatch):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG")

    def buggy(img):
        raise KeyError("a plugin's internal table")

    monkeypatch.setattr(images, "to_rgb_array", buggy)
    with pytest.raises(images.CorruptImageError, match="KeyError"):
        images.decode_image(buffer.getvalue(), name="x.png")


def test_the_pixel_limit_is_ours_not_pillows():
    # 90 MP is above Pillow's own warning level (~89.5 MP) and below the documented 100 MP limit.
    buffer = io.BytesIO()
    Image.new("1", (10_000, 9_000)).save(buffer, format="PNG")
    assert images.decode_image(buffer.getvalue()).shape == (9_000, 10_000, 3)
    with pytest.raises(images.ImageTooLargeError):
        images.decode_image(buffer.getvalue(), images.DecodeLimits(max_pixels=89_999_999))


def test_float_images_with_nan_decode():
    values = np.full((32, 32), np.nan, np.float32)
    values[:16] = 0.5
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="TIFF")
    out = images.decode_image(buffer.getvalue())
    assert out[0, 0, 0] == 128 and out[-1, -1, 0] == 0
