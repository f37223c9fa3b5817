"""Pictures of features: the attention map over the image and the selected keypoints (PIL only)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from delf_retrieval.features import Features


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
