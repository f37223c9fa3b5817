"""Contact sheets of landmarks: one JPEG per landmark, its representative large and members as thumbnails."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

from delf_retrieval.corpus.inputs import read_image

THUMB = 160  # thumbnail side, pixels
COLUMNS = 6


def _thumbnail(image: np.ndarray | None, side: int) -> Image.Image:
    tile = Image.new("RGB", (side, side), (235, 235, 235))
    if image is None:
        ImageDraw.Draw(tile).text((6, side // 2 - 6), "unreadable", fill=(150, 0, 0))
        return tile
    picture = Image.fromarray(image).convert("RGB")
    picture.thumbnail((side, side), Image.BILINEAR)
    tile.paste(picture, ((side - picture.width) // 2, (side - picture.height) // 2))
    return tile


def contact_sheet(title: str, representative: np.ndarray | None, members: list, captions: list) -> Image.Image:
    """A landmark as one picture: ``title`` on top, the representative at twice the thumbnail size
    on the left, then the ``members`` (RGB arrays, None if unreadable) as captioned thumbnails."""
    gap, caption = 6, 14
    big = 2 * THUMB + gap
    rows = max(1, -(-len(members) // COLUMNS))
    width = big + gap + COLUMNS * (THUMB + gap)
    height = caption + max(big + caption, rows * (THUMB + caption + gap))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title[:160], fill=(0, 0, 0))
    canvas.paste(_thumbnail(representative, big), (0, caption))
    for i, (image, text) in enumerate(zip(members, captions)):
        x = big + gap + (i % COLUMNS) * (THUMB + gap)
        y = caption + (i // COLUMNS) * (THUMB + caption + gap)
        canvas.paste(_thumbnail(image, THUMB), (x, y))
        draw.text((x + 1, y + THUMB + 1), text[:26], fill=(60, 60, 60))
    return canvas


def _read(uri: str) -> np.ndarray | None:
    try:
        return read_image(uri)
    except Exception:  # noqa: BLE001 - a sheet shows an unreadable member as such
        return None


def landmark_sheet(summary: dict, max_members: int = 17) -> bytes:
    """The JPEG bytes of one landmark's contact sheet from its summary record (reads the
    representative and up to ``max_members`` other members)."""
    others = [u for u in summary["members"] if u != summary["representative"]][:max_members]
    where = (f"  GPS {summary['latitude']:.4f}, {summary['longitude']:.4f} (radius {summary['radius_km']:.2f} km)"
             if summary.get("latitude") is not None else "")
    title = f"landmark {summary['landmark']}: {summary['size']} images{where}  representative {summary['representative']}"
    picture = contact_sheet(title, _read(summary["representative"]), [_read(u) for u in others],
                            [u.rsplit("/", 1)[-1] for u in others])
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=85)
    return out.getvalue()


def sheet_name(landmark: int) -> str:
    return f"sheets/landmark-{landmark:06d}.jpg"
