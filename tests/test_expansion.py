"""Verified query expansion: the neighbour table's cut, symmetry and update rules on known edges,
the index-time search finding planted pairs, and the query-time merge with its pinning."""

import numpy as np
import pytest

from delf_retrieval import quantize
from delf_retrieval.build import encode
from delf_retrieval.extraction.features import Features
from delf_retrieval.index import neighbour_table, shard_reader, shards
from delf_retrieval.query import expansion, retrieval
from delf_retrieval.query.matching import Match


def edges(table):
    return sorted(zip(table.image_ids.tolist(), table.neighbours.tolist(), table.inliers.tolist()))


def test_pairs_become_edges_both_ways_and_each_list_is_cut_to_k():
    table = neighbour_table.symmetric([1, 1, 2, 3], [2, 3, 1, 3], [10, 30, 12, 99])
    # 1-2 found from both sides keeps 12; a self-pair is dropped.
    assert edges(table) == [(1, 2, 12), (1, 3, 30), (2, 1, 12), (3, 1, 30)]
    assert table.of(1)[0].tolist() == [3, 2] and table.of(1)[1].tolist() == [30, 12]  # most inliers first
    assert table.of(9)[0].tolist() == []
    assert edges(neighbour_table.cut(table, 1)) == [(1, 3, 30), (2, 1, 12), (3, 1, 30)]
    again = neighbour_table.NeighbourTable.from_table(table.to_table())
    assert edges(again) == edges(table)


def test_no_verified_pair_at_all_is_an_empty_table():
    """A build where no image verifies against another (distinct scenes, a first small corpus)."""
    none = np.zeros(0, np.int64)
    assert edges(neighbour_table.symmetric(none, none, none)) == []
    assert edges(neighbour_table.symmetric([4], [4], [30])) == []  # a self-pair only
    empty = neighbour_table.NeighbourTable.empty()
    assert edges(neighbour_table.update(empty, empty, searched=np.array([1, 2]), removed=none, k=3)) == []


def test_an_update_drops_edges_of_changed_and_gone_images_and_adds_new_ones_both_ways():
    previous = neighbour_table.symmetric([1, 1, 2, 4], [2, 3, 3, 5], [20, 15, 11, 40])
    # Image 3 changed (searched again, finding 1 now), 5 was deleted, 6 is new and verifies with 1 and 2.
    found = neighbour_table.NeighbourTable(np.array([3, 6, 6]), np.array([1, 1, 2]), np.array([17, 50, 13]))
    updated = neighbour_table.update(previous, found, searched=np.array([3, 6]), removed=np.array([5]), k=2)
    assert edges(updated) == [(1, 2, 20), (1, 6, 50),  # 1's new edge to 3 (17) is cut: 2 per image
                              (2, 1, 20), (2, 6, 13), (3, 1, 17), (6, 1, 50), (6, 2, 13)]
    assert 5 not in updated.image_ids and 5 not in updated.neighbours and 4 not in updated.image_ids


def planted_pairs(n_pairs=8, per_image=150, dim=32, seed=0):
    """Images in pairs: image 2i + 1 sees 100 of image 2i's points under an affine map, with
    descriptor noise, plus 50 points of its own."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(dim, dim)).astype(np.float32)
    A, t = np.array([[0.9, 0.1], [-0.05, 0.95]]), np.array([20.0, -8.0])
    features = []
    for _ in range(n_pairs):
        points = rng.uniform(0, 600, (per_image, 2))
        descriptors = rng.normal(size=(per_image, dim)) @ basis
        features.append(Features(points.astype(np.float32), np.ones(per_image, np.float32),
                                 np.ones(per_image, np.float32), descriptors.astype(np.float32), (600, 600)))
        seen = rng.choice(per_image, 100, replace=False)
        twin_points = np.concatenate([points[seen] @ A.T + t, rng.uniform(0, 600, (50, 2))])
        twin_descriptors = np.concatenate([descriptors[seen] + 0.05 * rng.normal(size=(100, dim)) @ basis,
                                           rng.normal(size=(50, dim)) @ basis])
        features.append(Features(twin_points.astype(np.float32), np.ones(per_image, np.float32),
                                 np.ones(per_image, np.float32), twin_descriptors.astype(np.float32), (600, 600)))
    return features


@pytest.fixture(scope="module")
def paired_index(tmp_path_factory):
    features = planted_pairs()
    projection, quantizer = encode.train(np.concatenate([f.descriptors for f in features]),
                                        quantize.IndexParams(n_cells=8, pq_m=8, lopq=False), pca_dim=16)
    rows = [encode.encode_image(100 + i, f, projection, quantizer) for i, f in enumerate(features)]
    table = shards.image_table([{"image_id": 100 + i, "uri": f"db/{i}.jpg", "width": 600, "height": 600,
                                 "num_features": len(f), "content_hash": "0" * 64} for i, f in enumerate(features)])
    directory = str(tmp_path_factory.mktemp("pairs"))
    encode.write(directory, rows, table, projection, quantizer)
    return shard_reader.IndexReader(directory)


def test_each_image_finds_its_planted_twin_from_its_stored_rows(paired_index):
    retriever = retrieval.Retriever(paired_index, retrieval.RetrievalConfig())
    stored = expansion.rows_by_image(paired_index)
    assert sorted(stored) == list(range(100, 116))
    assert all(len(stored[i][0]) == 150 for i in stored)
    config = neighbour_table.NeighbourConfig(k=3, min_inliers=10)
    found = {}
    for image_id, (projected, locations) in stored.items():
        neighbours, inliers = expansion.search_neighbours(retriever, image_id, projected, locations, config)
        assert image_id not in neighbours.tolist() and len(neighbours) <= 3
        found[image_id] = dict(zip(neighbours.tolist(), inliers.tolist()))
    for i in range(100, 116):
        twin = i + 1 if (i - 100) % 2 == 0 else i - 1
        assert list(found[i]) == [twin], (i, found[i])  # only the twin verifies
        assert found[i][twin] >= 60  # most of the 100 shared points (codes are lossy)


def match(image_id, inliers, votes, verified=True):
    return Match(image_id, f"db/{image_id}", float(inliers), inliers, votes, verified)


def test_expansion_pins_the_expanding_images_and_ranks_the_rest_by_gained_inliers():
    table = neighbour_table.symmetric([1, 1, 2, 2], [5, 6, 6, 7], [40, 10, 25, 12])
    matches = [match(1, 50, 9), match(2, 30, 8), match(3, 4, 7), match(6, 0, 6, verified=False)]
    out = expansion.expand(matches, table, k=2, min_inliers=10, uri_of=lambda ids: [f"new/{i}" for i in ids], top=10)
    # 1 and 2 expand and stay on top; 6 gains 10 + 25, 5 gains 40 (a new image), 7 gains 12, 3 keeps its own 4.
    assert [m.image_id for m in out] == [1, 2, 5, 6, 7, 3]
    assert [m.score for m in out[2:]] == [40, 35, 12, 4]
    # The expansion images keep their own inliers as scores when those stay above what follows.
    assert [m.score for m in out[:2]] == [50, 41]
    assert out[2].uri == "new/5" and not out[2].verified and out[3].uri == "db/6"
    assert [m.image_id for m in expansion.expand(matches, table, 1, 10, lambda ids: ids, top=3)] == [1, 5, 2]
    # Nothing verified well enough: the matches are returned as they were.
    weak = [match(3, 4, 7), match(1, 8, 9)]
    assert expansion.expand(weak, table, 2, 10, lambda ids: ids, top=10) == weak


def test_a_retriever_expands_with_the_index_table_and_notes_an_index_without_one(paired_index, tmp_path):
    plain = retrieval.Retriever(paired_index, retrieval.RetrievalConfig(expand=0))
    noted = retrieval.Retriever(paired_index, retrieval.RetrievalConfig(expand=3))
    block = next(paired_index.stored_rows())
    query = block.take(block.image_ids == block.image_ids[0])
    without, asked = (r.search_projected(query.descriptors, query.locations) for r in (plain, noted))
    assert asked.notes == (retrieval.NO_NEIGHBOUR_TABLE,) and without.notes == ()
    assert [(m.image_id, m.score) for m in asked.matches] == [(m.image_id, m.score) for m in without.matches]
    with pytest.raises(ValueError, match="expand"):
        retrieval.RetrievalConfig(expand=-1)
