"""Image decoding: EXIF orientation, colour modes, size limits and typed errors for bad input."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, PngImagePlugin, UnidentifiedImageError

from delf_retrieval import storage
from delf_retrieval.corpus import gps

# Decoding never guesses at the rest of a truncated file.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: a decompression bomb beyond this is refused.
DEFAULT_MIN_SIDE = 16
DEFAULT_MAX_BYTES = 64 << 20  # encoded bytes read from any source (disk, gs://, http(s))
# The only decoders that ever see input bytes: nothing reaches PostScript, PDF or other exotic plugins.
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# File names taken as images when a folder or glob is listed.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Metadata is bounded: a PNG text or ICC chunk that inflates beyond MAX_METADATA_CHUNK, or text
# chunks beyond MAX_METADATA_TOTAL together, make the file too large (Pillow checks both).
MAX_METADATA_CHUNK = 1 << 20
MAX_METADATA_TOTAL = 8 << 20
PngImagePlugin.MAX_TEXT_CHUNK = MAX_METADATA_CHUNK
PngImagePlugin.MAX_TEXT_MEMORY = MAX_METADATA_TOTAL

# Magic numbers of formats that are recognised but not decoded (reason "unsupported").
_OTHER_FORMATS = (
    (b"%PDF", "PDF"), (b"%!PS", "PostScript"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"8BPS", "Photoshop"),
    (b"\x00\x00\x01\x00", "ICO"), (b"\x00\x00\x02\x00", "CUR"), (b"\xffO\xffQ", "JPEG 2000"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"icns", "ICNS"), (b"DDS ", "DDS"), (b"qoif", "QOI"),
    (b"\x76\x2f\x31\x01", "OpenEXR"), (b"#?RADIANCE", "Radiance HDR"), (b"SIMPLE  =", "FITS"),
    (b"<svg", "SVG"), (b"<?xml", "XML/SVG"), (b"\x59\xa6\x6a\x95", "Sun raster"), (b"FORM", "IFF"),
    (b"gimp xcf", "GIMP XCF"), (b"BLP", "BLP"), (b"\x01\xda", "SGI"), (b"\x0a\x05\x01", "PCX"),
    (b"Image type", "IM"), (b"#define", "XBM"), (b"DanM", "MSP"), (b"LinS", "MSP"),
)


class ImageError(ValueError):
    """An input that cannot become an image; ``reason`` is a short stable code for dead letters."""

    reason = "invalid"


class EmptyImageError(ImageError):
    reason = "empty"


class UnreadableImageError(ImageError):
    reason = "unreadable"


class CorruptImageError(ImageError):
    reason = "corrupt"


class TruncatedImageError(ImageError):
    reason = "truncated"


class ImageTooLargeError(ImageError):
    reason = "too_large"


class ImageTooSmallError(ImageError):
    reason = "too_small"


class UnsupportedImageError(ImageError):
    reason = "unsupported"


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds an image must respect before it is decoded or used."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE


def content_hash(data: bytes) -> str:
    """SHA-256 of the encoded bytes, hex: identifies an image independently of its name."""
    return hashlib.sha256(data).hexdigest()


class ImageFacts(NamedTuple):
    """What the image table records of a decoded file besides its pixels: the content hash and the
    EXIF GPS position (None when absent or malformed)."""

    content_hash: str
    latitude: float | None = None
    longitude: float | None = None


def image_facts(data: bytes) -> ImageFacts:
    """The :class:`ImageFacts` of an image file's bytes (never raises on bad metadata)."""
    where = gps.read_gps(data)
    return ImageFacts(content_hash(data), *(where if where is not None else (None, None)))


def read_bytes(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a local image file of at most ``max_bytes``: a missing, unreadable or non-regular file
    (FIFO, device, directory) is :class:`UnreadableImageError`, a larger one :class:`ImageTooLargeError`."""

    try:
        return storage.read_bounded(path, max_bytes)
    except storage.TooLarge as e:
        raise ImageTooLargeError(str(e)) from e
    except OSError as e:
        raise UnreadableImageError(f"{path}: cannot read file: {e.strerror or e}") from e


def other_format(data: bytes) -> str | None:
    """The name of a recognised image or document format that is not decoded, from its magic number."""
    head = data[:16]
    for magic, name in _OTHER_FORMATS:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        return "HEIF/AVIF"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3].isspace():
        return "Netpbm"
    return None


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits(), name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to an upright RGB ``uint8`` array of shape (H, W, 3).

    Only JPEG, PNG, WebP, GIF (its first frame), BMP and TIFF are decoded. Applies EXIF orientation,
    converts grayscale / CMYK / palette / 16-bit / float images to RGB, composites transparency over
    white. Whatever the bytes, the only exception it raises is a subclass of :class:`ImageError`:
    empty, corrupt, truncated, too large (pixels or metadata), too small, or unsupported.
    """
    if not data:
        raise EmptyImageError(f"{name}: zero-byte file")
    try:
        with warnings.catch_warnings():
            # Decoders warn about the damage they survive (corrupt EXIF, short reads): the outcome is
            # what counts. The pixel limit is ours, not Pillow's (which warns above ~89 MP).
            warnings.simplefilter("ignore")
            return _decode(data, limits, name)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: {e}") from e
    except MemoryError as e:
        raise ImageTooLargeError(f"{name}: out of memory while decoding") from e
    except UnidentifiedImageError as e:
        other = other_format(data)
        if other:
            raise UnsupportedImageError(f"{name}: {other} is not a decoded format "
                                        f"(decoded: {', '.join(DECODED_FORMATS)})") from e
        raise CorruptImageError(f"{name}: not a recognised image format") from e
    except (EOFError, OSError) as e:
        if isinstance(e, EOFError) or "truncated" in str(e).lower():
            raise TruncatedImageError(f"{name}: truncated file: {e}") from e
        raise CorruptImageError(f"{name}: cannot decode image: {e}") from e
    except ValueError as e:
        if "too large" in str(e).lower() or "too much memory" in str(e).lower():
            raise ImageTooLargeError(f"{name}: metadata too large: {e}") from e
        raise CorruptImageError(f"{name}: cannot decode image: {type(e).__name__}: {e}") from e
    except Exception as e:  # noqa: BLE001 - a decoder's own bug on hostile bytes is still a corrupt file
        raise CorruptImageError(f"{name}: cannot decode image: {type(e).__name__}: {e}") from e


def _decode(data: bytes, limits: DecodeLimits, name: str) -> np.ndarray:
    img = Image.open(io.BytesIO(data), formats=DECODED_FORMATS)
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}"
        )
    img.load()
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image: keep it as stored
        pass
    rgb = to_rgb_array(img)
    if min(rgb.shape[:2]) < limits.min_side:
        raise ImageTooSmallError(
            f"{name}: {rgb.shape[1]}x{rgb.shape[0]} is smaller than {limits.min_side} px on a side"
        )
    return rgb


def to_rgb_array(img: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any mode to an RGB ``uint8`` array."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) grayscale: rescale the full 16-bit range to 8 bits.
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        top = 1.0 if arr.size and arr.max() <= 1.0 else 255.0
        arr = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def load_image(path: str, limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """Read (see :func:`read_bytes`) and decode (see :func:`decode_image`) a local image file."""
    return decode_image(read_bytes(path), limits, name=path)
