"""Pictures of features and answers: the attention map over the image and the selected keypoints,
and a query beside its matches with their inliers (PIL only)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from delf_retrieval.corpus.inputs import read_image
from delf_retrieval.extraction.features import Features


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with a blue-green-yellow-red ramp."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([[0, 0, 128], [0, 128, 255], [0, 200, 100], [255, 230, 0], [220, 0, 0]], np.float64)
    pos = v * (len(stops) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)[..., 0]
    frac = pos[..., 0] - lo
    rgb = stops[lo] * (1 - frac[..., None]) + stops[lo + 1] * frac[..., None]
    return rgb.astype(np.uint8)


def attention_figure(image: np.ndarray, score_map: np.ndarray, features: Features, max_points: int = 300) -> Image.Image:
    """Side by side: the image with its strongest keypoints (circle radius ~ 1/scale), and the score
    map (normalised to its range) blended over the image."""
    height, width = image.shape[:2]
    left = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(left)
    order = np.argsort(-features.scores, kind="stable")[:max_points]
    for (y, x), scale in zip(features.locations[order], features.scales[order]):
        r = max(2.0, 6.0 / float(scale))
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 40, 40), width=2)
    span = float(score_map.max() - score_map.min()) if score_map.size else 0.0
    norm = (score_map - score_map.min()) / span if span > 0 else np.zeros_like(score_map)
    heat = Image.fromarray(colormap(norm)).resize((width, height), Image.BILINEAR)
    right = Image.blend(Image.fromarray(image).convert("RGB"), heat, 0.55)
    canvas = Image.new("RGB", (2 * width + 8, height), (255, 255, 255))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (width + 8, 0))
    return canvas


def _fit_height(image: np.ndarray, height: int) -> tuple[Image.Image, float]:
    factor = height / image.shape[0]
    width = max(1, int(round(image.shape[1] * factor)))
    return Image.fromarray(image).convert("RGB").resize((width, height), Image.BILINEAR), factor


def attention_overlay(picture: Image.Image, score_map: np.ndarray) -> Image.Image:
    """The score map (normalised to its range) blended over a picture of the image it was computed on."""
    span = float(score_map.max() - score_map.min()) if score_map.size else 0.0
    norm = (score_map - score_map.min()) / span if span > 0 else np.zeros((1, 1))
    heat = Image.fromarray(colormap(norm)).resize(picture.size, Image.BILINEAR)
    return Image.blend(picture.convert("RGB"), heat, 0.55)


def matches_figure(query: np.ndarray, score_map: np.ndarray, matches: list, database_images: list,
                   height: int = 320, max_lines: int = 200, first_rank: int = 1) -> Image.Image:
    """A query's answer as one picture: the query beside its attention (score) map on the first
    row, then per match the query beside the database image with the RANSAC inliers drawn as
    lines, captioned with rank (from ``first_rank``), score, inliers and votes. ``matches`` carry
    ``query_points`` and ``database_points`` as (y, x); ``database_images`` align with them (None:
    not readable)."""
    gap, caption_height = 8, 16
    query_picture, query_factor = _fit_height(query, height)
    rows = [(attention_overlay(query_picture, score_map), 1.0, None, "query | attention map")]
    for rank, (match, image) in enumerate(zip(matches, database_images), first_rank):
        picture, factor = _fit_height(image, height) if image is not None else (None, 1.0)
        rows.append((picture, factor, match, f"#{rank} score {match.score:.1f} inliers {match.inliers} "
                                             f"votes {match.votes}  {match.uri}"))
    right = max((r[0].width if r[0] is not None else height) for r in rows)
    canvas = Image.new("RGB", (query_picture.width + gap + right, len(rows) * (height + caption_height + gap)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    left = query_picture.width + gap
    for i, (picture, factor, match, caption) in enumerate(rows):
        top = i * (height + caption_height + gap)
        draw.text((2, top + 1), caption[:200], fill=(0, 0, 0))
        top += caption_height
        canvas.paste(query_picture, (0, top))
        if picture is None:
            draw.rectangle([left, top, left + height, top + height], outline=(150, 150, 150))
            draw.text((left + 4, top + 4), "unreadable", fill=(150, 0, 0))
            continue
        canvas.paste(picture, (left, top))
        if match is not None:
            for (qy, qx), (dy, dx) in list(zip(match.query_points, match.database_points))[:max_lines]:
                draw.line([qx * query_factor, top + qy * query_factor, left + dx * factor, top + dy * factor],
                          fill=(40, 220, 40), width=1)
    return canvas


def picture_name(rank: int, query: str) -> str:
    """A file name for the picture of the ``rank``-th query, readable and safe on any filesystem."""
    stem = os.path.splitext(os.path.basename(query.rstrip("/")))[0] or "query"
    return f"{rank:04d}_{''.join(c if c.isalnum() or c in '-_.' else '_' for c in stem)}.png"


def query_picture(image: np.ndarray, score_map: np.ndarray, matches: list, first_rank: int = 1) -> Image.Image:
    """:func:`matches_figure` of one query, reading each match's database image from its uri (shown
    as unreadable if it cannot be read)."""

    database_images = []
    for match in matches:
        try:
            database_images.append(read_image(match.uri))
        except Exception:  # noqa: BLE001 - a picture shows the database image as unreadable
            database_images.append(None)
    return matches_figure(image, score_map, matches, database_images, first_rank=first_rank)


def write_query_picture(folder: str, rank: int, query: str, image: np.ndarray, score_map: np.ndarray,
                        matches: list) -> str:
    """Write :func:`query_picture` of one query into ``folder``; returns the file's path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, picture_name(rank, query))
    query_picture(image, score_map, matches).save(path)
    return path
