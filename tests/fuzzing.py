"""Seeded fuzz corpora for the decoder: small valid images in every format Pillow can write, and
mutated copies of them (flipped bytes, truncation, inserted and repeated runs, saturated length
fields). Used by tests/test_fuzz_decode.py and benchmarks/fuzz_decode.py."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

# (format, mode, save options): each writable format, with the variants its decoder branches on.
BASES = (
    ("JPEG", "RGB", {"quality": 90}), ("JPEG", "L", {}), ("JPEG", "CMYK", {}), ("JPEG", "RGB", {"progressive": True}),
    ("PNG", "RGB", {}), ("PNG", "RGBA", {}), ("PNG", "P", {}), ("PNG", "I;16", {}), ("PNG", "1", {}),
    ("WEBP", "RGB", {"quality": 80}), ("WEBP", "RGBA", {"lossless": True}),
    ("GIF", "P", {}), ("GIF", "RGB", {"save_all": True, "frames": 3}),
    ("BMP", "RGB", {}), ("BMP", "P", {}), ("BMP", "1", {}),
    ("TIFF", "RGB", {}), ("TIFF", "RGB", {"compression": "tiff_lzw"}), ("TIFF", "L", {"compression": "tiff_deflate"}),
    ("TIFF", "RGB", {"compression": "jpeg"}), ("TIFF", "I;16", {}), ("TIFF", "F", {}), ("TIFF", "CMYK", {"compression": "packbits"}),
    ("AVIF", "RGB", {}), ("BLP", "P", {}), ("DDS", "RGB", {}), ("DIB", "RGB", {}), ("EPS", "RGB", {}),
    ("ICO", "RGB", {}), ("IM", "RGB", {}), ("JPEG2000", "RGB", {}), ("MPO", "RGB", {}), ("MSP", "1", {}),
    ("PALM", "1", {}), ("PCX", "RGB", {}), ("PDF", "RGB", {}), ("PPM", "RGB", {}), ("QOI", "RGB", {}),
    ("SGI", "RGB", {}), ("SPIDER", "F", {}), ("TGA", "RGB", {}), ("XBM", "1", {}),
)
DECODED = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def base_image(mode: str, rng: np.random.Generator, size=(48, 40)) -> Image.Image:
    """A small textured image in ``mode`` (smooth gradients plus noise, so codecs have work to do)."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1).astype(np.int64)
    rgb = np.clip(rgb + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        return Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))
    if mode == "F":
        return Image.fromarray(rgb[..., 0].astype(np.float32) / 255.0)
    return img.convert(mode)


def encoded_bases(seed: int = 0) -> list[tuple[str, bytes]]:
    """(label, bytes) of every base that this Pillow build can write."""
    rng = np.random.default_rng(seed)
    out = []
    for fmt, mode, options in BASES:
        options = dict(options)
        frames = options.pop("frames", 0)
        img = base_image(mode, rng)
        buffer = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if frames:
                    rest = [base_image(mode, rng).convert(img.mode) for _ in range(frames - 1)]
                    img.save(buffer, format=fmt, append_images=rest, **options)
                else:
                    img.save(buffer, format=fmt, **options)
        except Exception:  # noqa: BLE001 - a writer this build lacks (an optional codec)
            continue
        label = f"{fmt}-{mode}" + "".join(f"-{k}={v}" for k, v in sorted(options.items()))
        out.append((label, buffer.getvalue()))
    return out


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One seeded mutation of encoded bytes."""
    b = bytearray(data)
    kind = int(rng.integers(0, 6))
    if kind == 0:  # flip a few bytes anywhere
        for pos in rng.integers(0, len(b), int(rng.integers(1, 9))):
            b[pos] ^= int(rng.integers(1, 256))
    elif kind == 1:  # flip bytes in the header, where sizes and lengths live
        for pos in rng.integers(0, min(len(b), 96), int(rng.integers(1, 5))):
            b[pos] = int(rng.integers(0, 256))
    elif kind == 2:  # truncate
        b = b[: int(rng.integers(0, len(b)))]
    elif kind == 3:  # insert random bytes
        pos = int(rng.integers(0, len(b) + 1))
        b[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif kind == 4:  # repeat a slice (duplicated chunks, markers, strips)
        start = int(rng.integers(0, len(b)))
        piece = b[start:start + int(rng.integers(1, 256))]
        b[start:start] = piece * int(rng.integers(1, 4))
    else:  # saturate a 4-byte field: huge lengths, offsets, dimensions
        pos = int(rng.integers(0, max(len(b) - 4, 1)))
        b[pos:pos + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x01\x00\x00"])
    return bytes(b)


def corpus(n: int, seed: int = 0):
    """``n`` (label, bytes) mutants, spread evenly over the bases, reproducible from ``seed``."""
    bases = encoded_bases(seed)
    rng = np.random.default_rng(seed + 1)
    for i in range(n):
        label, data = bases[i % len(bases)]
        yield label, mutate(data, rng)
