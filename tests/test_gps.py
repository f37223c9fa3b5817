"""EXIF GPS read from files the tests write with Pillow: good positions, and malformed ones as missing."""

import io
import math
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, TiffImagePlugin

from delf_retrieval.corpus import gps, images
from delf_retrieval.index import shards

R = TiffImagePlugin.IFDRational


def jpeg_with_gps(block: dict | None, fmt: str = "JPEG") -> bytes:
    image = Image.new("RGB", (40, 30), (120, 80, 40))
    out = io.BytesIO()
    if block is None:
        image.save(out, fmt)
    else:
        exif = Image.Exif()
        exif[gps.GPS_IFD] = block
        image.save(out, fmt, exif=exif)
    return out.getvalue()


PARIS = {1: "N", 2: (R(48, 1), R(51, 1), R(2412, 100)), 3: "E", 4: (R(2, 1), R(17, 1), R(40, 1))}


def test_a_position_is_read_in_signed_decimal_degrees():
    where = gps.read_gps(jpeg_with_gps(PARIS))
    assert where == pytest.approx((48 + 51 / 60 + 24.12 / 3600, 2 + 17 / 60 + 40 / 3600))
    south_west = {1: "S", 2: (R(33, 1), R(52, 1), R(0, 1)), 3: "W", 4: (R(151, 1), R(12, 1), R(30, 1))}
    assert gps.read_gps(jpeg_with_gps(south_west)) == pytest.approx((-(33 + 52 / 60), -(151 + 12.5 / 60)))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_other_formats_with_exif(fmt):
    assert gps.read_gps(jpeg_with_gps(PARIS, fmt)) == pytest.approx(gps.read_gps(jpeg_with_gps(PARIS)))


@pytest.mark.parametrize("block", [
    {},                                                                          # an empty GPS block
    {1: "N", 2: (R(48, 1), R(51, 1), R(0, 1))},                                   # no longitude
    {1: "N", 2: (R(48, 0), R(51, 1), R(0, 1)), 3: "E", 4: PARIS[4]},               # zero denominator
    {1: "N", 2: (R(0, 0), R(0, 0), R(0, 0)), 3: "E", 4: (R(0, 0), R(0, 0), R(0, 0))},
    {1: "N", 2: (R(91, 1), R(0, 1), R(0, 1)), 3: "E", 4: PARIS[4]},                # latitude > 90
    {1: "N", 2: PARIS[2], 3: "E", 4: (R(181, 1), R(0, 1), R(0, 1))},               # longitude > 180
    {1: "N", 2: (R(48, 1), R(75, 1), R(0, 1)), 3: "E", 4: PARIS[4]},               # 75 minutes
    {1: "X", 2: PARIS[2], 3: "E", 4: PARIS[4]},                                    # not N or S
    {1: 7, 2: PARIS[2], 3: "E", 4: PARIS[4]},                                      # a number as reference
    {1: "N", 2: (R(48, 1), R(51, 1)), 3: "E", 4: PARIS[4]},                        # two parts
    {1: "N", 2: R(48, 1), 3: "E", 4: PARIS[4]},                                    # one number
])
def test_malformed_gps_is_missing(block):
    data = jpeg_with_gps(block)
    assert gps.read_gps(data) is None
    assert images.image_facts(data) == (images.content_hash(data), None, None)
    assert images.decode_image(data).shape == (30, 40, 3)  # the image itself still decodes


def test_a_gps_pointer_outside_the_exif_is_missing():
    data = bytearray(jpeg_with_gps(PARIS))
    tiff = data.index(b"Exif\x00\x00") + 6
    little = data[tiff:tiff + 2] == b"II"
    order = "<" if little else ">"
    first_ifd = struct.unpack(order + "I", data[tiff + 4:tiff + 8])[0]
    entries = struct.unpack(order + "H", data[tiff + first_ifd:tiff + first_ifd + 2])[0]
    for i in range(entries):
        at = tiff + first_ifd + 2 + 12 * i
        if struct.unpack(order + "H", data[at:at + 2])[0] == gps.GPS_IFD:
            data[at + 8:at + 12] = struct.pack(order + "I", 0x7FFFFFF0)  # far beyond the block
            break
    else:
        pytest.fail("no GPS pointer written")
    assert gps.read_gps(bytes(data)) is None
    assert images.decode_image(bytes(data)).shape == (30, 40, 3)


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff", b"not an image", jpeg_with_gps(None), jpeg_with_gps(PARIS)[:60]])
def test_no_exif_or_broken_bytes_are_missing(data):
    assert gps.read_gps(data) is None


def test_position_of_odd_blocks():
    assert gps.position(None) is None and gps.position([1, 2]) is None
    assert gps.position({1: b"N", 2: (1, 2, 3), 3: b"E\x00", 4: (4, 5, 6)}) == pytest.approx(
        (1 + 2 / 60 + 3 / 3600, 4 + 5 / 60 + 6 / 3600))
    assert gps.position({1: "N", 2: (True, 2, 3), 3: "E", 4: (4, 5, 6)}) is None
    assert gps.position({1: "N", 2: "48 deg 51 min", 3: "E", 4: (4, 5, 6)}) is None
    for bad in (float("nan"), float("inf"), -4.0, None, object(), 1e400, R(1, 0)):  # values Pillow will not write
        assert gps.position({1: "N", 2: (bad, 1.0, 2.0), 3: "E", 4: (4, 5, 6)}) is None


def test_distance():
    paris, london = (48.8566, 2.3522), (51.5074, -0.1278)
    assert gps.distance_km(*paris, *london) == pytest.approx(343.5, abs=1.0)
    assert float(gps.distance_km(*paris, *paris)) == 0.0
    assert gps.distance_km(np.array([0.0, 0.0]), np.array([0.0, 0.0]), 0.0, np.array([1.0, 180.0])) == pytest.approx(
        [111.19, math.pi * gps.EARTH_RADIUS_KM], rel=1e-3)


def test_image_tables_without_gps_columns_read_with_nulls():
    old = pa.schema([f for f in shards.IMAGE_SCHEMA if f.name not in shards.OPTIONAL_IMAGE_COLUMNS])
    table = pa.Table.from_pylist([{"image_id": 1, "uri": "a.jpg", "width": 4, "height": 3, "num_features": 2,
                                   "content_hash": "h", "label": None, "stamp": None}], schema=old)
    out = io.BytesIO()
    pq.write_table(table, out)
    read = shards.read_image_table(out.getvalue(), "images.parquet")
    assert read.schema == shards.IMAGE_SCHEMA
    assert read.to_pylist()[0]["latitude"] is None and read.to_pylist()[0]["uri"] == "a.jpg"
    new = shards.image_table([{"image_id": 2, "uri": "b.jpg", "width": 4, "height": 3, "num_features": 2,
                               "content_hash": "h", "latitude": 48.5, "longitude": 2.25}])
    out = io.BytesIO()
    pq.write_table(new, out)
    assert shards.read_image_table(out.getvalue(), "x").to_pylist()[0]["longitude"] == 2.25


def test_mutated_exif_never_raises():
    rng = np.random.default_rng(7)
    data = jpeg_with_gps(PARIS)
    start = data.index(b"Exif\x00\x00")
    for _ in range(400):
        mutant = bytearray(data)
        for at in rng.integers(start, min(start + 400, len(data)), int(rng.integers(1, 6))):
            mutant[at] = int(rng.integers(0, 256))
        where = gps.read_gps(bytes(mutant))
        assert where is None or (-90 <= where[0] <= 90 and -180 <= where[1] <= 180)
