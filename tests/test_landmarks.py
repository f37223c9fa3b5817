"""Landmark clustering on graphs with known answers: cliques, bridges, one-off photos, GPS splits."""

import itertools

import numpy as np
import pytest

from delf_retrieval.landmarks import clustering
from delf_retrieval.landmarks.clustering import NONE, ClusterConfig, cluster


def clique(members, inliers=50):
    return [(a, b, inliers) for a, b in itertools.combinations(members, 2)]


def run(n, edges, latitude=None, longitude=None, **config):
    e = np.asarray(edges, np.int64).reshape(-1, 3)
    return cluster(n, e[:, 0], e[:, 1], e[:, 2], latitude, longitude, ClusterConfig(**config))


def same_partition(labels, groups):
    """Whether ``labels`` put exactly each of ``groups`` together (other images: NONE)."""
    grouped = set(itertools.chain(*groups))
    if any(labels[i] != NONE for i in range(len(labels)) if i not in grouped):
        return False
    ids = [labels[list(g)] for g in groups]
    return all(len(set(x)) == 1 and x[0] != NONE for x in ids) and len({int(x[0]) for x in ids}) == len(groups)


def test_two_cliques_and_one_off_photos():
    edges = clique(range(0, 6)) + clique(range(6, 10)) + [(10, 11, 60)]  # 10 and 11: a pair, below min_size
    result = run(13, edges)
    assert same_partition(result.labels, [range(0, 6), range(6, 10)])
    assert list(result.labels[:6]) == [0] * 6 and list(result.labels[6:10]) == [1] * 4  # largest first
    assert list(result.labels[10:]) == [NONE] * 3 and list(result.scores[10:]) == [0] * 3
    assert result.count == 2 and result.scores[0] == 50


def test_one_ambiguous_photo_does_not_chain_two_landmarks():
    # photo 12 matches three of each landmark strongly
    edges = clique(range(0, 6)) + clique(range(6, 12)) + [(12, i, 60) for i in (0, 1, 2, 6, 7, 8)]
    labels = run(13, edges).labels
    assert labels[0] != labels[6]
    assert same_partition(labels, [range(0, 6), range(6, 12)]) or \
        same_partition(labels, [list(range(0, 6)) + [12], range(6, 12)]) or \
        same_partition(labels, [range(0, 6), list(range(6, 12)) + [12]])


def test_one_strong_edge_between_landmarks_does_not_chain_them():
    edges = clique(range(0, 5)) + clique(range(5, 10)) + [(4, 5, 200)]
    assert same_partition(run(10, edges).labels, [range(0, 5), range(5, 10)])


def test_weak_edges_are_not_evidence():
    edges = clique(range(0, 4), inliers=12) + [(4, 5, 14)]
    assert (run(6, edges).labels == NONE).all()
    assert same_partition(run(6, edges, min_inliers=10, min_size=2).labels, [range(0, 4), (4, 5)])


def test_a_pair_that_only_matches_itself_is_a_landmark_only_when_min_size_allows():
    assert same_partition(run(3, [(0, 1, 30)], min_size=2).labels, [(0, 1)])
    assert (run(3, [(0, 1, 30)]).labels == NONE).all()


def test_a_photo_that_lost_its_edges_for_support_joins_its_best_landmark():
    # 9 sees 0 and 1 strongly and 5 weakly-supported: it joins landmark of 0..4 and chains nothing
    edges = clique(range(0, 5)) + clique(range(5, 9)) + [(9, 0, 40), (9, 5, 25)]
    labels = run(10, edges, min_support=0.6).labels
    assert labels[9] == labels[0] != labels[5]


def test_gps_splits_one_visual_cluster_and_untagged_photos_follow_their_neighbours():
    # one visual clique of 8; 0-2 in Paris, 3-5 in Rome, 6 and 7 untagged (6 sees only Paris, 7 only Rome)
    edges = clique(range(0, 6)) + [(6, i, 40) for i in (0, 1, 2)] + [(7, i, 40) for i in (3, 4, 5)]
    lat = np.array([48.85, 48.86, 48.84, 41.90, 41.89, 41.91, np.nan, np.nan])
    lon = np.array([2.35, 2.34, 2.36, 12.49, 12.48, 12.50, np.nan, np.nan])
    labels = run(8, edges, lat, lon).labels
    assert same_partition(labels, [(0, 1, 2, 6), (3, 4, 5, 7)])
    assert same_partition(run(8, edges).labels, [range(8)])  # without GPS: one landmark


def test_gps_keeps_look_alikes_in_two_cities_apart():
    # two look-alike buildings: all photos match each other, the cities are 600 km apart
    edges = clique(range(0, 10))
    lat = np.r_[np.full(5, 52.52), np.full(5, 48.14)]
    lon = np.r_[np.full(5, 13.40), np.full(5, 11.58)]
    labels = run(10, edges, lat, lon).labels
    assert same_partition(labels, [range(0, 5), range(5, 10)])


def test_no_two_photos_farther_apart_than_the_limit_share_a_landmark():
    rng = np.random.default_rng(0)
    n = 60
    edges = [(a, b, int(rng.integers(20, 80))) for a, b in itertools.combinations(range(n), 2) if rng.random() < 0.3]
    lat = np.where(rng.random(n) < 0.7, 45.0 + rng.random(n) * 0.6, np.nan)  # a 67 km span
    lon = np.where(np.isfinite(lat), 7.0 + rng.random(n) * 0.6, np.nan)
    result = run(n, edges, lat, lon)
    for label in set(result.labels[result.labels >= 0].tolist()):
        members = np.flatnonzero((result.labels == label) & np.isfinite(lat))
        if len(members) > 1:
            assert clustering.pairwise_km(lat[members], lon[members]).max() <= 25.0


def test_a_geotagged_photo_attaches_only_near_its_landmark():
    edges = clique(range(0, 5)) + clique(range(5, 9)) + [(9, 0, 40), (9, 5, 25)]
    lat = np.r_[np.full(9, 40.0), 10.0]
    lon = np.r_[np.full(9, 3.0), 3.0]
    assert run(10, edges, lat, lon, min_support=0.6).labels[9] == NONE


def test_representatives_are_the_best_connected_members():
    edges = clique(range(0, 4), inliers=30) + [(2, i, 90) for i in (0, 1, 3)]
    result = run(4, edges)
    assert list(clustering.representatives(result.labels, *result.edges)) == [2]


def test_odd_input():
    assert run(0, []).count == 0
    result = run(3, [(0, 0, 50), (0, 7, 50), (-1, 1, 50)])  # self-loops and unknown positions
    assert (result.labels == NONE).all()
    with pytest.raises(ValueError):
        ClusterConfig(min_support=2.0)
    assert ClusterConfig.from_json(ClusterConfig().to_json()) == ClusterConfig()


def test_cost_is_near_linear_on_a_large_sparse_graph():
    rng = np.random.default_rng(1)
    n, size = 20000, 10
    groups = np.arange(n) // size
    a = rng.integers(0, n, 8 * n)
    b = groups[a] * size + rng.integers(0, size, len(a))  # edges inside groups of 10
    result = cluster(n, a, b, np.full(len(a), 40))
    assert result.count >= n // size * 0.9


def test_recognition_picks_the_landmark_with_most_verified_inliers():
    from delf_retrieval.landmarks.recognition import Recognizer, RecognitionConfig
    from delf_retrieval.query.matching import Match

    recognizer = Recognizer(np.array([1, 2, 3, 4, 5]), np.array([7, 7, 8, NONE, 8]), {7: "a.jpg", 8: "c.jpg"})
    matches = [Match(3, "c.jpg", 90.0, 60, 90, True), Match(1, "a.jpg", 50.0, 40, 50, True),
               Match(2, "b.jpg", 45.0, 35, 45, True), Match(4, "d.jpg", 99.0, 99, 99, True),
               Match(5, "e.jpg", 10.0, 0, 10, False)]  # unverified: no evidence
    found = recognizer.recognize(matches)
    assert (found.landmark, found.confidence, found.images, found.representative) == (7, 75.0, 2, "a.jpg")
    assert found.to_json()["landmark"] == 7
    none = recognizer.recognize([Match(4, "d.jpg", 99.0, 99, 99, True), Match(1, "a.jpg", 9.0, 9, 20, True)])
    assert none.landmark is None and none.confidence == 0 and none.to_json()["landmark"] == "none"
    assert recognizer.recognize([]).landmark is None
    strict = Recognizer(np.array([1]), np.array([7]), config=RecognitionConfig(min_confidence=50))
    assert strict.recognize([Match(1, "a.jpg", 40.0, 40, 50, True)]).landmark is None
    assert list(recognizer.landmark_of(np.array([5, 6, 1]))) == [8, NONE, 7]
    assert Recognizer(np.zeros(0), np.zeros(0)).recognize(matches).landmark is None


def test_the_table_round_trips_and_damage_only_costs_recognition(tmp_path):
    import json

    import pyarrow as pa

    from delf_retrieval.index import layout
    from delf_retrieval.index.neighbour_table import NeighbourTable, symmetric
    from delf_retrieval.landmarks import recognition, table

    images = pa.table({"image_id": pa.array([10, 11, 12, 13, 14], pa.int64()),
                       "uri": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"],
                       "latitude": pa.array([48.8, 48.8001, None, None, None], pa.float64()),
                       "longitude": pa.array([2.3, 2.3001, None, None, None], pa.float64())})
    edges = symmetric([10, 10, 11, 12], [11, 12, 12, 99], [40, 40, 40, 40])  # 99 is not live
    found = table.find(images, edges)
    assert list(found.landmarks) == [0, 0, 0, NONE, NONE] and found.next_id == 1
    assert found.summary[0]["size"] == 3 and found.summary[0]["geotagged"] == 2
    assert found.summary[0]["radius_km"] < 0.1
    record = table.save(str(tmp_path), "v1", found)
    assert set(record["files"]) == {"landmarks.parquet", "summary.json", "ground_truth.json"}
    back = table.load(str(tmp_path), "v1")
    assert list(back.landmarks) == list(found.landmarks) and back.uris == found.uris
    assert table.load(str(tmp_path), "v2") is None and table.load(str(tmp_path / "none")) is None
    # a later run where a and b remain and a new pair appears: the old landmark keeps id 0, the new one gets 1
    later = pa.table({"image_id": pa.array([10, 11, 20, 21], pa.int64()), "uri": ["a.jpg", "b.jpg", "x.jpg", "y.jpg"]})
    pairs = clustering.ClusterConfig(min_size=2)
    again = table.find(later, NeighbourTable(np.array([10, 20]), np.array([11, 21]), np.array([50, 50])), pairs, back)
    assert dict(zip(again.uris, again.landmarks.tolist())) == {"a.jpg": 0, "b.jpg": 0, "x.jpg": 1, "y.jpg": 1}
    assert again.next_id == 2
    # damage: a replaced table file is refused by its checksum; recognition goes on without landmarks
    (tmp_path / "landmarks" / "v1" / "landmarks.parquet").write_bytes(b"garbage")
    with pytest.raises(layout.IndexStorageError):
        table.load(str(tmp_path))
    assert recognition.load(str(tmp_path)) is None
    (tmp_path / "landmarks.json").write_text("{not json")
    assert recognition.load(str(tmp_path)) is None
    (tmp_path / "landmarks.json").write_text(json.dumps({"format_version": 1, "index_id": "v1", "files": {}}))
    assert recognition.load(str(tmp_path)) is None
