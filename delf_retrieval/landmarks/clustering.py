"""Landmarks from the verified-neighbour graph and GPS: supported strong edges, connected components,
then a split of any component whose photos lie farther apart than the GPS limit (ClusterConfig)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import sparse
from scipy.cluster import hierarchy
from scipy.sparse import csgraph

from delf_retrieval.corpus import gps

NONE = -1  # the landmark of an image that belongs to none


@dataclass(frozen=True)
class ClusterConfig:
    """How images become landmarks (chosen on landmarks-dev, -hard and -train: benchmarks/landmarks.py).

    An edge (a verified pair) is *strong* with at least ``min_inliers`` RANSAC inliers. A strong edge
    is kept when it is *supported*: the two images share at least ``min_support`` of the strong
    neighbours of the better connected one (shared / (max degree - 1)), or one of them has no other
    strong neighbour (a leaf cannot join two groups). Kept edges make connected components; a
    component of fewer than ``min_size`` images is no landmark. Two geotagged images more than
    ``max_distance_km`` apart never share a landmark."""

    min_inliers: int = 15
    min_support: float = 0.5
    min_size: int = 3
    max_distance_km: float = 25.0

    def __post_init__(self):
        if self.min_inliers < 1 or not 0.0 <= self.min_support <= 1.0 or self.min_size < 2:
            raise ValueError("min_inliers must be >= 1, min_support in [0, 1], min_size >= 2")
        if not self.max_distance_km > 0:
            raise ValueError("max_distance_km must be > 0")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ClusterConfig":
        return cls(int(data["min_inliers"]), float(data["min_support"]), int(data["min_size"]),
                   float(data["max_distance_km"]))


@dataclass
class Clustering:
    """Per image (in the order given): its landmark (0.., or NONE) and its score, the inliers of its
    strongest kept edge inside its landmark (0 for NONE); and the kept edges (positions, inliers)."""

    labels: np.ndarray
    scores: np.ndarray
    edges: tuple[np.ndarray, np.ndarray, np.ndarray]

    @property
    def count(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) and self.labels.max() >= 0 else 0


def undirected(n: int, a: np.ndarray, b: np.ndarray, inliers: np.ndarray):
    """Edges between positions 0..n-1 once each (a < b), a pair seen twice keeping its larger count;
    self-loops and positions outside 0..n-1 dropped."""
    a, b, w = np.asarray(a, np.int64), np.asarray(b, np.int64), np.asarray(inliers, np.int64)
    ok = (a != b) & (a >= 0) & (b >= 0) & (a < n) & (b < n)
    a, b, w = a[ok], b[ok], w[ok]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((-w, hi, lo))
    lo, hi, w = lo[order], hi[order], w[order]
    first = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])] if len(lo) else np.zeros(0, bool)
    return lo[first], hi[first], w[first]


def shared_neighbours(n: int, a: np.ndarray, b: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """For each undirected edge (a[i], b[i]), the number of images adjacent to both. Sparse
    products over chunks of edges: the work is sum over edges of the two degrees."""
    if not len(a):
        return np.zeros(0, np.int64)
    ones = np.ones(2 * len(a), np.int8)
    adjacency = sparse.csr_matrix((ones, (np.r_[a, b], np.r_[b, a])), shape=(n, n), dtype=np.int8)
    adjacency.sum_duplicates()
    out = np.empty(len(a), np.int64)
    for lo in range(0, len(a), chunk):
        rows_a, rows_b = adjacency[a[lo:lo + chunk]], adjacency[b[lo:lo + chunk]]
        out[lo:lo + chunk] = np.asarray(rows_a.multiply(rows_b).sum(axis=1)).ravel()
    return out


def supported(n: int, a: np.ndarray, b: np.ndarray, inliers: np.ndarray, config: ClusterConfig) -> np.ndarray:
    """Which undirected edges are kept: strong, and supported by shared strong neighbours (or a leaf's)."""
    strong = inliers >= config.min_inliers
    a_s, b_s = a[strong], b[strong]
    degree = np.bincount(np.r_[a_s, b_s], minlength=n)
    shared = shared_neighbours(n, a_s, b_s)
    most = np.maximum(degree[a_s], degree[b_s])
    leaf = np.minimum(degree[a_s], degree[b_s]) <= 1
    support = shared / np.maximum(most - 1, 1)
    keep = np.zeros(len(a), bool)
    keep[np.flatnonzero(strong)] = leaf | (support >= config.min_support)
    return keep


def cluster(n: int, a, b, inliers, latitude=None, longitude=None,
            config: ClusterConfig = ClusterConfig()) -> Clustering:
    """Landmarks of ``n`` images from verified pairs (positions ``a``, ``b`` with their inliers, either
    direction, duplicates allowed) and optional GPS (degrees, NaN where unknown). Linear in the edges
    but for the shared-neighbour count (the sum of the degrees over the edges) and the GPS split
    (quadratic in the geotagged images of one component that must be split)."""
    a, b, w = undirected(n, a, b, inliers)
    lat = np.full(n, np.nan) if latitude is None else np.asarray(latitude, np.float64)
    lon = np.full(n, np.nan) if longitude is None else np.asarray(longitude, np.float64)
    geo = np.isfinite(lat) & np.isfinite(lon)
    far = geo[a] & geo[b]
    far[far] = gps.distance_km(lat[a[far]], lon[a[far]], lat[b[far]], lon[b[far]]) > config.max_distance_km
    a, b, w = a[~far], b[~far], w[~far]  # a verified pair too far apart is two landmarks that look alike
    strong = w >= config.min_inliers
    keep = supported(n, a, b, w, config)[strong]
    a, b, w = a[strong], b[strong], w[strong]
    labels = components(n, a[keep], b[keep])
    labels = split_by_distance(labels, a[keep], b[keep], w[keep], lat, lon, geo, config.max_distance_km)
    labels = numbered(labels, config.min_size)
    labels, keep = attach(labels, a, b, w, keep, lat, lon, geo, config.max_distance_km)
    return Clustering(labels, scores(n, labels, a[keep], b[keep], w[keep]), (a[keep], b[keep], w[keep]))


def attach(labels: np.ndarray, a, b, w, keep: np.ndarray, lat, lon, geo, max_km: float) -> tuple[np.ndarray, np.ndarray]:
    """Images left in no landmark join the one their strong edges carry the most inliers to (the
    edges they lost for want of support): one image joins one landmark, so it chains none, and
    images attached here attach nothing. Returns the labels and the kept edges (those attached by)."""
    out = labels.copy()
    loose_a, loose_b = (labels[a] < 0) & (labels[b] >= 0), (labels[b] < 0) & (labels[a] >= 0)
    image = np.r_[a[loose_a], b[loose_b]]
    target = np.r_[labels[b[loose_a]], labels[a[loose_b]]]
    weight = np.r_[w[loose_a], w[loose_b]]
    edge = np.r_[np.flatnonzero(loose_a), np.flatnonzero(loose_b)]
    if not len(image):
        return out, keep
    order = np.lexsort((target, image))
    image, target, weight, edge = image[order], target[order], weight[order], edge[order]
    pair = np.r_[True, (image[1:] != image[:-1]) | (target[1:] != target[:-1])]
    starts = np.flatnonzero(pair)
    totals = np.add.reduceat(weight, starts)
    p_image, p_target = image[starts], target[starts]
    best = np.lexsort((p_target, -totals, p_image))  # per image its heaviest landmark, ties: the lower id
    first = np.r_[True, p_image[best][1:] != p_image[best][:-1]]
    chosen_image, chosen_target = p_image[best][first], p_target[best][first]
    tagged = geo[chosen_image]
    if tagged.any():  # a geotagged image joins only a landmark whose geotagged images are all near it
        near = np.ones(len(chosen_image), bool)
        placed = np.flatnonzero(geo & (labels >= 0))
        placed = placed[np.argsort(labels[placed], kind="stable")]
        joined_here: dict[int, list] = {}  # geotagged images attached so far, by landmark
        for i in np.flatnonzero(tagged):
            lo, hi = np.searchsorted(labels[placed], [chosen_target[i], chosen_target[i] + 1])
            members = np.r_[placed[lo:hi], joined_here.get(int(chosen_target[i]), [])].astype(np.int64)
            near[i] = not len(members) or bool(np.all(
                gps.distance_km(lat[chosen_image[i]], lon[chosen_image[i]], lat[members], lon[members]) <= max_km))
            if near[i]:
                joined_here.setdefault(int(chosen_target[i]), []).append(int(chosen_image[i]))
        chosen_image, chosen_target = chosen_image[near], chosen_target[near]
    out[chosen_image] = chosen_target
    keep = keep.copy()
    joined = np.full(len(labels), NONE - 1, np.int64)
    joined[chosen_image] = chosen_target
    keep[edge[joined[image] == target]] = True
    return out, keep


def components(n: int, a: np.ndarray, b: np.ndarray, nodes: np.ndarray | None = None) -> np.ndarray:
    """Connected-component label of each position (union-find's answer; scipy's linear traversal)."""
    graph = sparse.csr_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return csgraph.connected_components(graph, directed=False)[1].astype(np.int64)


def split_by_distance(labels: np.ndarray, a, b, w, lat, lon, geo, max_km: float) -> np.ndarray:
    """Components whose geotagged images span more than ``max_km`` split: the geotagged ones by
    complete linkage (no two farther apart than ``max_km`` in one part), the others joining the part
    they reach first over kept edges, the one they carry most inliers to (label propagation), then each
    part cut to its connected pieces."""
    labels = labels.copy()
    next_label = int(labels.max()) + 1 if len(labels) else 0
    tagged_all = np.flatnonzero(geo)
    tagged_all = tagged_all[np.argsort(labels[tagged_all], kind="stable")]
    bounds = np.flatnonzero(np.r_[True, labels[tagged_all][1:] != labels[tagged_all][:-1], True])
    split = [tagged_all[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:]) if hi - lo >= 2
             and not _diameter_within(lat[tagged_all[lo:hi]], lon[tagged_all[lo:hi]], max_km)]
    if not split:
        return labels
    by_label = np.argsort(labels, kind="stable")
    starts = np.searchsorted(labels[by_label], [labels[t[0]] for t in split])
    ends = np.searchsorted(labels[by_label], [labels[t[0]] for t in split], side="right")
    for tagged, lo, hi in zip(split, starts, ends):
        members = by_label[lo:hi]
        part = np.full(len(labels), -1, np.int64)
        part[tagged] = complete_linkage(lat[tagged], lon[tagged], max_km)
        inside = np.isin(a, members) & np.isin(b, members)
        ea, eb, ew = a[inside], b[inside], w[inside]
        for _ in range(len(members)):  # untagged images take a part of their neighbours', nearest first
            if not _propagate(part, ea, eb, ew):
                break
        part[members[part[members] < 0]] = 0  # unreachable cannot happen in a component; kept safe
        keep = part[ea] == part[eb]
        pieces = components(len(labels), ea[keep], eb[keep])
        for key in np.unique(pieces[members] * (part.max() + 1) + part[members]):
            chosen = members[(pieces[members] * (part.max() + 1) + part[members]) == key]
            labels[chosen] = next_label
            next_label += 1
    return labels


def _propagate(part: np.ndarray, a, b, w) -> bool:
    """One round: each image without a part whose edges reach images with one takes the part its
    edges carry most inliers to (ties: the lower part). Whether any image took a part."""
    to_a, to_b = (part[a] < 0) & (part[b] >= 0), (part[b] < 0) & (part[a] >= 0)
    image = np.r_[a[to_a], b[to_b]]
    if not len(image):
        return False
    target = np.r_[part[b[to_a]], part[a[to_b]]]
    weight = np.r_[w[to_a], w[to_b]]
    order = np.lexsort((target, image))
    image, target, weight = image[order], target[order], weight[order]
    starts = np.flatnonzero(np.r_[True, (image[1:] != image[:-1]) | (target[1:] != target[:-1])])
    totals = np.add.reduceat(weight, starts)
    image, target = image[starts], target[starts]
    best = np.lexsort((target, -totals, image))
    first = np.r_[True, image[best][1:] != image[best][:-1]]
    part[image[best][first]] = target[best][first]
    return True


def _diameter_within(lat: np.ndarray, lon: np.ndarray, max_km: float) -> bool:
    if len(lat) < 2:
        return True
    # a cheap bound first: every point within max_km / 2 of the first one
    if np.all(gps.distance_km(lat[0], lon[0], lat, lon) <= max_km / 2):
        return True
    return bool(np.all(pairwise_km(lat, lon) <= max_km))


def pairwise_km(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    return gps.distance_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :])


def complete_linkage(lat: np.ndarray, lon: np.ndarray, max_km: float) -> np.ndarray:
    """Groups 0.. of points where no two in a group are more than ``max_km`` apart."""
    if len(lat) == 1:
        return np.zeros(1, np.int64)
    distances = pairwise_km(lat, lon)
    condensed = distances[np.triu_indices(len(lat), 1)]
    tree = hierarchy.linkage(condensed, method="complete")
    return hierarchy.fcluster(tree, t=max_km, criterion="distance").astype(np.int64) - 1


def numbered(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Labels renumbered 0.. by size (largest first, ties by smallest position); groups smaller
    than ``min_size`` become NONE."""
    if not len(labels):
        return labels.astype(np.int64)
    unique, first, counts = np.unique(labels, return_index=True, return_counts=True)
    big = counts >= min_size
    order = np.lexsort((first[big], -counts[big]))
    mapping = np.full(len(unique), NONE, np.int64)
    mapping[np.flatnonzero(big)[order]] = np.arange(len(order))
    return mapping[np.searchsorted(unique, labels)]


def scores(n: int, labels: np.ndarray, a, b, w) -> np.ndarray:
    """Per image the inliers of its strongest kept edge to another image of its landmark (0 if none)."""
    out = np.zeros(n, np.int64)
    same = (labels[a] == labels[b]) & (labels[a] >= 0)
    np.maximum.at(out, a[same], w[same])
    np.maximum.at(out, b[same], w[same])
    return out


def representatives(labels: np.ndarray, a, b, w) -> np.ndarray:
    """Per landmark 0..count-1 the position of its member with the most kept inliers to the others."""
    count = int(labels.max()) + 1 if len(labels) and labels.max() >= 0 else 0
    strength = np.zeros(len(labels), np.float64)
    same = (labels[a] == labels[b]) & (labels[a] >= 0)
    np.add.at(strength, a[same], w[same])
    np.add.at(strength, b[same], w[same])
    order = np.lexsort((np.arange(len(labels)), -strength, labels))  # by landmark, strongest first
    order = order[labels[order] >= 0]
    out = np.full(count, -1, np.int64)
    first = np.r_[True, labels[order][1:] != labels[order][:-1]] if len(order) else np.zeros(0, bool)
    out[labels[order][first]] = order[first]
    return out
