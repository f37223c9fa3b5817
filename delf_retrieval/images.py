"""Image decoding: EXIF orientation, colour modes, size limits and typed errors for bad input."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Decoding never guesses at the rest of a truncated file.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 100_000_000  # 100 MP: a decompression bomb beyond this is refused.
DEFAULT_MIN_SIDE = 16
# File names taken as images when a folder or glob is listed.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


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


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds an image must respect before it is decoded or used."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE


def content_hash(data: bytes) -> str:
    """SHA-256 of the encoded bytes, hex: identifies an image independently of its name."""
    return hashlib.sha256(data).hexdigest()


def read_bytes(path: str) -> bytes:
    """Read a local file, turning I/O failures into :class:`UnreadableImageError`."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UnreadableImageError(f"{path}: cannot read file: {e.strerror or e}") from e


def decode_image(data: bytes, limits: DecodeLimits = DecodeLimits(), name: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to an upright RGB ``uint8`` array of shape (H, W, 3).

    Applies EXIF orientation, converts grayscale / CMYK / palette / 16-bit / float images to RGB,
    composites transparency over white, and raises a subclass of :class:`ImageError` for an empty,
    corrupt, truncated, too large or too small input.
    """
    if not data:
        raise EmptyImageError(f"{name}: zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{name}: {e}") from e
    except UnidentifiedImageError as e:
        raise CorruptImageError(f"{name}: not a recognised image format") from e
    except OSError as e:
        raise CorruptImageError(f"{name}: cannot open image: {e}") from e

    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}"
        )
    try:
        img.load()
    except OSError as e:
        if "truncated" in str(e).lower() or isinstance(e, EOFError):
            raise TruncatedImageError(f"{name}: truncated file: {e}") from e
        raise CorruptImageError(f"{name}: cannot decode image: {e}") from e
    except (SyntaxError, ValueError, EOFError) as e:
        raise TruncatedImageError(f"{name}: cannot decode image: {e}") from e

    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # A broken EXIF block must not lose the image: keep it as stored.
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
        arr = np.asarray(img, dtype=np.float64)
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
    """Read and decode a local image file (see :func:`decode_image`)."""
    return decode_image(read_bytes(path), limits, name=path)
