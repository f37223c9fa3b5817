"""EXIF GPS of an image file: (latitude, longitude) in degrees, or None when absent or malformed."""

from __future__ import annotations

import io
import math
import warnings
from typing import NamedTuple

import numpy as np
from PIL import Image

GPS_IFD = 0x8825  # the EXIF pointer to the GPS block
LATITUDE_REF, LATITUDE, LONGITUDE_REF, LONGITUDE = 1, 2, 3, 4
EARTH_RADIUS_KM = 6371.0088  # mean radius (IUGG)


class Position(NamedTuple):
    """A point on the Earth in decimal degrees (north and east positive)."""

    latitude: float
    longitude: float


def read_gps(data: bytes, formats: tuple = ("JPEG", "PNG", "WEBP", "TIFF")) -> Position | None:
    """The GPS position that an image file's EXIF records, or None: no EXIF, no GPS block, or a
    malformed one (a zero denominator, NaN, degrees out of range, values of the wrong type or count,
    a reference other than N/S or E/W, a block pointing outside the EXIF). Reads the header only and
    never raises, whatever the bytes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=formats) as img:
                block = img.getexif().get_ifd(GPS_IFD)
                return position(block)
    except Exception:  # noqa: BLE001 - hostile metadata is "no GPS", never an error
        return None


def position(block) -> Position | None:
    """A GPS block (tag -> value, as Pillow reads it) as a Position, or None when malformed."""
    if not isinstance(block, dict):
        return None
    latitude = _degrees(block.get(LATITUDE), block.get(LATITUDE_REF), "N", "S", 90.0)
    longitude = _degrees(block.get(LONGITUDE), block.get(LONGITUDE_REF), "E", "W", 180.0)
    if latitude is None or longitude is None:
        return None
    return Position(latitude, longitude)


def _degrees(value, ref, positive: str, negative: str, limit: float) -> float | None:
    """(degrees, minutes, seconds) and its reference letter as signed decimal degrees, or None."""
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    if not isinstance(ref, str) or ref.strip("\x00 ").upper() not in (positive, negative):
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        return None
    parts = []
    for part in value:
        if isinstance(part, (bool, str, bytes)):
            return None
        try:
            number = float(part)
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            return None
        if not math.isfinite(number) or number < 0:
            return None
        parts.append(number)
    d, m, s = parts
    if m >= 60 or s >= 60:
        return None
    degrees = d + m / 60.0 + s / 3600.0
    if degrees > limit:
        return None
    return -degrees if ref.strip("\x00 ").upper() == negative else degrees


def distance_km(a_latitude, a_longitude, b_latitude, b_longitude):
    """Great-circle (haversine) distance in km between points in degrees; numpy arrays broadcast."""
    la, lb = np.radians(a_latitude), np.radians(b_latitude)
    dl = np.radians(np.asarray(b_longitude) - np.asarray(a_longitude))
    h = np.sin((lb - la) / 2) ** 2 + np.cos(la) * np.cos(lb) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))
