"""Query-time retrieval: one-to-one putative matches and votes against brute force, the planted
image found first with its inliers, the image shortlist, results.json and its pictures from the
CLI, and the Beam search giving the same answers."""

import json
import os
import shutil

import numpy as np
import pytest

from delf_retrieval import quantize
from delf_retrieval.build import encode
from delf_retrieval.extraction.features import Features
from delf_retrieval.index import shard_reader, shards
from delf_retrieval.query import matching, retrieval
from pipeline import run as run_job
from pipeline import search as search_cli
from tests.conftest import SAMPLES
from tests.test_pipeline import FAST, SCENES


def brute_force_matches(squared, rows, images, max_distance):
    """The rule of putative_matches, written as loops: rows keep their nearest query descriptor,
    then each (query descriptor, image) keeps its nearest row."""
    candidates = [(np.sqrt(max(squared[q, j], 0)), rows[q, j], q, images[q, j])
                  for q in range(rows.shape[0]) for j in range(rows.shape[1])
                  if rows[q, j] >= 0 and np.sqrt(max(squared[q, j], 0)) <= max_distance]
    candidates.sort(key=lambda c: (c[0], c[2], c[1]))
    taken_rows, taken_pairs, kept = set(), set(), []
    for distance, row, q, image in candidates:
        if row in taken_rows:
            continue
        taken_rows.add(row)
        if (q, image) in taken_pairs:
            continue
        taken_pairs.add((q, image))
        kept.append((q, row, image))
    return sorted(kept)


def test_putative_matches_are_one_to_one_as_brute_force():
    rng = np.random.default_rng(4)
    nq, k = 40, 8
    rows = rng.integers(0, 60, (nq, k))
    rows[rng.random((nq, k)) < 0.1] = -1
    images = np.where(rows >= 0, rows // 6, -1)  # 6 rows per image
    squared = np.sort(rng.uniform(0, 1.2, (nq, k)), axis=1).astype(np.float32)
    got = matching.putative_matches(squared, rows, images, max_distance=0.95)
    assert sorted(zip(got.query.tolist(), got.rows.tolist(), got.images.tolist())) == \
        brute_force_matches(squared, rows, images, 0.95)
    assert len(np.unique(got.rows)) == len(got)  # one query descriptor per database row
    flat = np.sqrt(squared.ravel()[got.positions])
    np.testing.assert_allclose(flat, got.distances, rtol=1e-6)
    ids, votes = matching.count_votes(got)
    for image, n in zip(ids, votes):
        assert n == len({q for q, img in zip(got.query, got.images) if img == image})
    assert np.all(np.diff(votes) <= 0)


def test_scores_follow_the_rule():
    inliers, votes = np.array([2, 10, 0]), np.array([50, 20, 5])
    paper = retrieval.RetrievalConfig(rank_by="inliers", min_inliers=4)
    np.testing.assert_array_equal(retrieval.combined_score(inliers, votes, paper), [0, 10, 0])
    combined = retrieval.RetrievalConfig(rank_by="combined", min_inliers=4, vote_weight=0.5)
    np.testing.assert_array_equal(retrieval.combined_score(inliers, votes, combined), [25, 20, 2.5])
    with pytest.raises(ValueError, match="rank_by"):
        retrieval.RetrievalConfig(rank_by="magic")


def planted_corpus(n_images=30, per_image=200, dim=48, seed=0):
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(dim, dim)).astype(np.float32)
    return [Features(locations=rng.uniform(0, 600, (per_image, 2)).astype(np.float32),
                     scales=np.ones(per_image, np.float32), scores=np.ones(per_image, np.float32),
                     descriptors=(rng.normal(size=(per_image, dim)) @ basis).astype(np.float32),
                     image_size=(600, 600)) for _ in range(n_images)]


@pytest.fixture(scope="module")
def planted_index(tmp_path_factory):
    features = planted_corpus()
    projection, quantizer = encode.train(np.concatenate([f.descriptors for f in features]),
                                        quantize.IndexParams(n_cells=16))
    encoded = [encode.encode_image(1000 + i, f, projection, quantizer) for i, f in enumerate(features)]
    table = shards.image_table([{"image_id": 1000 + i, "uri": f"db/{i}.jpg", "width": 600, "height": 600,
                                 "num_features": len(f), "content_hash": "0" * 64} for i, f in enumerate(features)])
    directory = str(tmp_path_factory.mktemp("planted"))
    encode.write(directory, encoded, table, projection, quantizer)
    return directory, features


def planted_query(features, target=7, keep=120, clutter=80, seed=1):
    """Image ``target`` seen under a known affine map (query -> database), with descriptor noise,
    plus clutter descriptors from nowhere in the database."""
    rng = np.random.default_rng(seed)
    source = features[target]
    chosen = rng.choice(len(source), keep, replace=False)
    A = np.array([[0.8, 0.15], [-0.1, 0.9]])
    t = np.array([30.0, -12.0])
    db_points = source.locations[chosen].astype(np.float64)
    query_points = np.linalg.solve(A, (db_points - t).T).T  # db = A q + t
    noise = 0.05 * rng.normal(size=(keep, source.descriptors.shape[1])) * source.descriptors[chosen].std()
    descriptors = np.concatenate([source.descriptors[chosen] + noise,
                                  rng.normal(size=(clutter, source.descriptors.shape[1])) * 10])
    locations = np.concatenate([query_points, rng.uniform(0, 600, (clutter, 2))]).astype(np.float32)
    n = keep + clutter
    return Features(locations, np.ones(n, np.float32), np.ones(n, np.float32), descriptors.astype(np.float32),
                    (600, 600)), (A, t)


def test_planted_image_is_found_first_with_its_geometry(planted_index):
    directory, features = planted_index
    query, (A, t) = planted_query(features)
    reader = shard_reader.IndexReader(directory)
    result = retrieval.Retriever(reader, retrieval.RetrievalConfig(max_distance=10.0, nprobe=16)).search(query)
    best = result.matches[0]
    assert best.uri == "db/7.jpg" and best.verified
    assert best.inliers >= 100 and best.votes >= best.inliers  # most of the 120 planted matches
    assert all(m.inliers < 10 for m in result.matches[1:])  # chance matches elsewhere have no geometry
    # The inliers drawn are the planted correspondences: database = A query + t.
    np.testing.assert_allclose(best.query_points @ A.T + t, best.database_points, atol=0.5)
    assert set(result.timings) == {"shortlist", "ann", "voting", "ransac"}
    # Limited to other images, the planted one is absent.
    others = retrieval.Retriever(reader, retrieval.RetrievalConfig(max_distance=10.0, nprobe=16)).search(
        query, among=np.array([1000 + i for i in range(30) if i != 7]))
    assert "db/7.jpg" not in [m.uri for m in others.matches] and others.matches
    # Deterministic: the same query gives the same answer.
    again = retrieval.Retriever(reader, retrieval.RetrievalConfig(max_distance=10.0, nprobe=16)).search(query)
    assert [m.to_json() for m in again.matches] == [m.to_json() for m in result.matches]


def test_rank_by_votes_and_top_limit(planted_index):
    directory, features = planted_index
    query, _ = planted_query(features)
    reader = shard_reader.IndexReader(directory)
    config = retrieval.RetrievalConfig(max_distance=10.0, rank_by="votes", top=3, shortlist=2)
    result = retrieval.Retriever(reader, config).search(query)
    assert len(result.matches) == 3 and result.matches[0].uri == "db/7.jpg"
    assert [m.verified for m in result.matches] == [True, True, False]  # only the shortlist is verified
    assert result.matches[2].inliers == 0
    empty = Features(np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32),
                     np.zeros((0, 48), np.float32), (10, 10))
    assert retrieval.Retriever(reader, config).search(empty).matches == []


def test_a_search_restricted_to_images_equals_the_unrestricted_one_filtered(planted_index):
    directory, features = planted_index
    reader = shard_reader.IndexReader(directory)
    query, _ = planted_query(features)
    projected = reader.pca.transform(query.descriptors)
    candidates = np.array([1001, 1003, 1007, 1012, 1020], np.int64)
    # The ANN then only scans the candidates' rows, and equals a search of just those rows.
    distances, rows = reader.search(projected, 5, nprobe=16, image_ids=candidates)
    found = reader.rows(rows).image_ids
    assert set(np.unique(found[found >= 0])) <= set(candidates.tolist())
    _, all_rows = reader.search(projected, 200, nprobe=16)
    all_images = reader.rows(all_rows).image_ids
    for q in range(0, len(projected), 17):  # first 5 allowed neighbours of the unrestricted search
        allowed = all_rows[q][np.isin(all_images[q], candidates)][:5]
        np.testing.assert_array_equal(rows[q][: len(allowed)], allowed)
    # The same restriction over an index held in memory (load_all) scans the same rows.
    resident = shard_reader.IndexReader(directory)
    resident.load_all()
    resident_distances, resident_rows = resident.search(projected, 5, nprobe=16, image_ids=candidates)
    np.testing.assert_array_equal(resident_rows, rows)
    np.testing.assert_allclose(resident_distances, distances, rtol=1e-6)


@pytest.fixture(scope="module")
def scene_index(tmp_path_factory, cache_dir):
    """Up to three photographs of each of three scenes (never the last one, the query), indexed by
    the Beam job with cheap settings."""
    corpus = tmp_path_factory.mktemp("corpus")
    for scene in SCENES:
        (corpus / scene).mkdir()
        for name in scene_photos(scene)[:-1][:3]:
            shutil.copy(os.path.join(SAMPLES, scene, name), corpus / scene / name)
    output = tmp_path_factory.mktemp("scene-index")
    assert run_job.run(["--input", str(corpus), "--output", str(output), "--cells", "32"] + FAST) == 0
    return output


def scene_photos(scene):
    return sorted(os.listdir(os.path.join(SAMPLES, scene)))


def held_out_query(scene):
    """A photograph of ``scene`` that is not in the index."""
    return os.path.join(SAMPLES, scene, scene_photos(scene)[-1])


def test_search_cli_writes_results_json_table_and_pictures(scene_index, tmp_path, capsys):
    queries = [held_out_query(scene) for scene in SCENES] + [str(tmp_path / "missing.jpg")]
    output, pictures = tmp_path / "results.json", tmp_path / "pictures"
    code = search_cli.run(["--index", str(scene_index), "--output", str(output), "--top", "5",
                           "--visualize", str(pictures), *queries])
    assert code == 1  # one query could not be read; the others are answered
    document = json.loads(output.read_text())
    assert list(document) == ["results"] and [r["query"] for r in document["results"]] == queries
    for scene, result in zip(SCENES, document["results"][:3]):
        assert list(result) == ["query", "matches"] and 1 <= len(result["matches"]) <= 5
        for match in result["matches"]:
            assert list(match) == ["uri", "score", "inliers", "votes"]
            assert isinstance(match["uri"], str) and isinstance(match["score"], float)
            assert isinstance(match["inliers"], int) and isinstance(match["votes"], int)
        scores = [m["score"] for m in result["matches"]]
        assert scores == sorted(scores, reverse=True)
        assert f"/{scene}/" in result["matches"][0]["uri"]  # the same scene first
    assert document["results"][3]["matches"] == []
    out = capsys.readouterr()
    assert "missing.jpg" in out.err and "score" in out.out
    drawn = sorted(os.listdir(pictures))
    assert len(drawn) == 3 and all(name.endswith(".png") for name in drawn)
    from PIL import Image

    with Image.open(pictures / drawn[0]) as picture:
        assert picture.height > 320 * 2  # the query row plus its matches


def test_beam_search_gives_the_local_answers(scene_index, tmp_path):
    queries = [held_out_query(scene) for scene in SCENES[:2]] + [str(tmp_path / "missing.jpg")]
    local, beam = tmp_path / "local.json", tmp_path / "beam.json"
    assert search_cli.run(["--index", str(scene_index), "--output", str(local), *queries]) == 1
    assert search_cli.run(["--index", str(scene_index), "--output", str(beam), "--runner", "DirectRunner",
                           *queries]) == 1
    assert json.loads(beam.read_text()) == json.loads(local.read_text())


def test_lists_restricted_to_images_hold_exactly_their_rows_in_the_regions():
    from delf_retrieval.quantize.ivf import InvertedLists

    rng = np.random.default_rng(5)
    regions = rng.integers(0, 12, 300)
    row_images = rng.integers(0, 20, 300)
    order = np.lexsort((row_images, regions))  # an index's order: by region, then image
    regions, row_images = regions[order], row_images[order]
    lists = InvertedLists(np.searchsorted(regions, np.arange(13)).astype(np.int64),
                          rng.integers(0, 32, (300, 10)).astype(np.uint8), rng.permutation(300).astype(np.int64))
    chosen, images = np.array([2, 5, 5, 11, -1]), np.array([3, 7, 7, 19, 25])
    sub = lists.restrict_to_images(chosen, row_images, images)
    for r in range(12):
        span = slice(lists.offsets[r], lists.offsets[r + 1])
        kept = np.isin(row_images[span], images) & (r in (2, 5, 11))
        np.testing.assert_array_equal(sub.ids[sub.offsets[r]:sub.offsets[r + 1]], lists.ids[span][kept])
        np.testing.assert_array_equal(sub.codes[sub.offsets[r]:sub.offsets[r + 1]], lists.codes[span][kept])


def test_restricted_search_covers_every_region_of_a_split_cell(tmp_path):
    # LOPQ splits big cells into several regions: an image filter must scan all of them, lazily
    # and with the index held in memory alike.
    features = planted_corpus()
    projection, quantizer = encode.train(np.concatenate([f.descriptors for f in features]),
                                        quantize.IndexParams(n_cells=16, max_region_features=100,
                                                             min_region_train=10**9))
    assert quantizer.regions.n_regions > 16
    encoded = [encode.encode_image(1000 + i, f, projection, quantizer) for i, f in enumerate(features)]
    table = shards.image_table([{"image_id": 1000 + i, "uri": f"db/{i}.jpg", "width": 600, "height": 600,
                                 "num_features": len(f), "content_hash": "0" * 64} for i, f in enumerate(features)])
    encode.write(str(tmp_path), encoded, table, projection, quantizer)
    queries = projection.transform(features[7].descriptors[:50])
    candidates = np.array([1002, 1007, 1011, 1019, 1025])
    lazy = shard_reader.IndexReader(str(tmp_path))
    lazy_distances, lazy_rows = lazy.search(queries, 5, nprobe=4, image_ids=candidates)
    resident = shard_reader.IndexReader(str(tmp_path))
    resident.load_all()
    distances, rows = resident.search(queries, 5, nprobe=4, image_ids=candidates)
    np.testing.assert_array_equal(rows, lazy_rows)
    np.testing.assert_allclose(distances, lazy_distances, rtol=1e-6)
    # ... and both equal the unrestricted search with other images' rows struck out.
    all_distances, all_rows = lazy.search(queries, 400, nprobe=4)
    images = lazy.rows(all_rows).image_ids
    for q in range(len(queries)):
        allowed = all_rows[q][np.isin(images[q], candidates)][:5]
        np.testing.assert_array_equal(rows[q][: len(allowed)], allowed)
