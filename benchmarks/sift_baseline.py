"""The classical baseline of ``retrieval_quality.py``: OpenCV SIFT (long side 1024), Lowe's ratio test
0.8 and affine RANSAC (20 px, 1000 iterations), brute force over all pairs, ranked by inliers."""

from __future__ import annotations

import os
import time

import numpy as np

METHOD = "OpenCV SIFT ({}) + ratio 0.8 + affine RANSAC, all pairs"


def sift_matches(root, rows, database, queries, max_features: int) -> tuple[list, list, list]:
    """(per query {"query", "matches"} as a search's results, seconds of extraction per image,
    seconds of matching + RANSAC per query)."""
    import cv2

    from delf_retrieval.corpus.images import load_image

    sift = cv2.SIFT_create(nfeatures=max_features)
    keypoints, extract_seconds = {}, []
    for p, _ in rows:
        image = load_image(os.path.join(root, p))
        start = time.perf_counter()
        h, w = image.shape[:2]
        factor = min(1.0, 1024 / max(h, w))
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        if factor < 1:
            gray = cv2.resize(gray, (int(round(w * factor)), int(round(h * factor))), interpolation=cv2.INTER_AREA)
        kp, desc = sift.detectAndCompute(gray, None)
        extract_seconds.append(time.perf_counter() - start)
        points = np.array([k.pt for k in kp], np.float32) / factor if kp else np.zeros((0, 2), np.float32)
        keypoints[p] = (points, desc if desc is not None else np.zeros((0, 128), np.float32))
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    results, match_seconds = [], []
    for p in queries:
        start = time.perf_counter()
        qp, qd = keypoints[p]
        scored = []
        for other, _ in database:
            if other == p:
                continue
            dp, dd = keypoints[other]
            inliers = 0
            if len(qd) >= 2 and len(dd) >= 2:
                pairs = [m for m, n in (x for x in matcher.knnMatch(qd, dd, k=2) if len(x) == 2) if m.distance < 0.8 * n.distance]
                if len(pairs) >= 3:
                    src = qp[[m.queryIdx for m in pairs]]
                    dst = dp[[m.trainIdx for m in pairs]]
                    _, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=20.0,
                                                   maxIters=1000, confidence=0.999)
                    inliers = int(mask.sum()) if mask is not None else 0
            scored.append((inliers, other))
        match_seconds.append(time.perf_counter() - start)
        scored.sort(key=lambda s: (-s[0], s[1]))
        results.append({"query": p, "matches": [{"uri": o, "score": float(n), "inliers": n, "votes": 0}
                                                for n, o in scored if n > 0]})
    return results, extract_seconds, match_seconds
