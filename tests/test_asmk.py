"""The ASMK* first stage (delf_retrieval.first_stage.asmk) against literal references on small synthetic
data: binarization, selectivity, aggregation, the kernel as a double loop, parts and tombstones."""

from __future__ import annotations

import numpy as np
import pytest

from delf_retrieval.first_stage import asmk

D, K = 12, 6  # 12 bits: two bytes, the second one half used


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus():
    """A codebook of K words and 10 images (ids 100, 103, ...) of 15 descriptors near the words."""
    rng = np.random.default_rng(3)
    words = unit(rng.normal(size=(K, D)))
    images = {}
    for i in range(10):
        chosen = rng.choice(K, size=15)
        images[100 + 3 * i] = unit(words[chosen] + 0.4 * rng.normal(size=(15, D)))
    return asmk.Codebook(words), images


def rows(images, ids=None):
    ids = sorted(images) if ids is None else ids
    return (np.concatenate([np.full(len(images[i]), i) for i in ids]), np.concatenate([images[i] for i in ids]))


def literal_signatures(descriptors, words, multiple=1):
    """{word: sign bits (D,) bool} of one image, by a loop over its descriptors."""
    sums = {}
    for x in descriptors:
        distances = [float(np.sum((x - w) ** 2)) for w in words]
        for word in sorted(range(len(words)), key=lambda j: (distances[j], j))[:multiple]:
            sums[word] = sums.get(word, np.zeros(D)) + (x.astype(np.float64) - words[word])
    return {word: s > 0 for word, s in sums.items()}


def literal_scores(query, images, words, config, removed=()):
    """The normalised ASMK* similarity of the query to each live image, as a double loop over the
    query's and the image's (word, signature) pairs."""
    live = {i: literal_signatures(x, words, config.database_assignment) for i, x in images.items() if i not in removed}
    q = literal_signatures(query, words, config.query_assignment)
    weight = {}
    for word in range(len(words)):
        holding = sum(word in s for s in live.values())
        weight[word] = (np.log(len(live) / holding) ** 2 if holding else 0.0) if config.idf else 1.0
    q_norm = np.sqrt(sum(weight[w] for w in q))
    out = {}
    for i, signatures in live.items():
        total = 0.0
        for qw, qb in q.items():
            for w, b in signatures.items():
                if w == qw:
                    u = 1.0 - 2.0 * np.sum(qb != b) / D
                    total += weight[w] * (u ** config.alpha if u > config.tau else 0.0)
        norm = np.sqrt(sum(weight[w] for w in signatures))
        out[i] = total / (norm * q_norm) if norm > 0 else 0.0
    return out


def test_binarize_packs_the_signs_of_each_component():
    residuals = np.array([[0.5, -1.0, 0.0, 2.0, -0.1, 0.3, 0.3, -3.0, 1.0]])
    packed = asmk.binarize(residuals)
    assert packed.shape == (1, 2) and packed.dtype == np.uint8
    assert packed[0, 0] == 0b10010110 and packed[0, 1] == 0b10000000  # first component = highest bit
    assert asmk.hamming(packed, asmk.binarize(-residuals))[0] == 8  # the zero stays unset on both sides


def test_selectivity_is_a_signed_power_above_the_threshold():
    u = np.array([1.0, 0.5, 0.0, -0.5, 0.2])
    np.testing.assert_allclose(asmk.selectivity(u, 3.0, 0.0), [1.0, 0.125, 0.0, 0.0, 0.008])
    np.testing.assert_allclose(asmk.selectivity(u, 3.0, -1.0), [1.0, 0.125, 0.0, -0.125, 0.008])
    np.testing.assert_allclose(asmk.selectivity(u, 1.0, 0.3), [1.0, 0.5, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(asmk.selectivity(u, 1.0, 0.5), [1.0, 0.0, 0.0, 0.0, 0.0])  # u = tau is no match
    table = asmk.similarity_table(8, 3.0, 0.0)  # u(h) = 1 - 2h/8
    np.testing.assert_allclose(table, [1.0, 0.421875, 0.125, 0.015625, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("multiple", [1, 2])
def test_a_part_holds_each_images_binarized_aggregated_residuals(corpus, multiple):
    codebook, images = corpus
    part = asmk.AsmkPart.build(codebook, rows(images), multiple=multiple)
    assert part.image_ids.tolist() == sorted(images)
    words = part.words()
    for position, image in enumerate(part.image_ids.tolist()):
        expected = literal_signatures(images[image], codebook.words, multiple)
        mine = np.flatnonzero(part.images == position)
        assert sorted(words[mine].tolist()) == sorted(expected)
        for e in mine:
            bits = np.unpackbits(part.signatures[e])[:D].astype(bool)
            assert (bits == expected[int(words[e])]).all()


def test_rows_split_anywhere_give_the_same_part(corpus):
    codebook, images = corpus
    ids, descriptors = rows(images)
    order = np.random.default_rng(0).permutation(len(ids))  # an image's rows over several chunks
    chunks = [(ids[order[s:s + 17]], descriptors[order[s:s + 17]]) for s in range(0, len(ids), 17)]
    one, split = asmk.AsmkPart.build(codebook, (ids, descriptors)), asmk.AsmkPart.build(codebook, chunks)
    for name in ("image_ids", "offsets", "images", "signatures"):
        np.testing.assert_array_equal(getattr(one, name), getattr(split, name))


@pytest.mark.parametrize("kernel", ["compiled", "numpy"])
@pytest.mark.parametrize("config", [asmk.AsmkConfig(), asmk.AsmkConfig(idf=False, query_assignment=3),
                                    asmk.AsmkConfig(alpha=1.0, tau=-0.5, database_assignment=2)],
                         ids=["asmk*", "ma3-no-idf", "alpha1-tau-0.5-dbma2"])
def test_the_kernel_equals_a_literal_double_loop(corpus, kernel, config):
    codebook, images = corpus
    part = asmk.AsmkPart.build(codebook, rows(images), multiple=config.database_assignment)
    searcher = asmk.AsmkSearcher(codebook, [part], config, kernel=kernel)
    query = images[106][:10] + 0.05
    expected = literal_scores(query, images, codebook.words, config)
    scores = searcher.scores(query)[0]
    np.testing.assert_allclose(scores, [expected[i] for i in part.image_ids.tolist()], rtol=1e-5, atol=1e-6)


def test_an_image_is_its_own_best_match_with_similarity_one(corpus):
    codebook, images = corpus
    searcher = asmk.AsmkSearcher(codebook, [asmk.AsmkPart.build(codebook, rows(images))], asmk.AsmkConfig(idf=False))
    ids, scores = searcher.search(images[112], 3)
    assert ids[0] == 112 and scores[0] == pytest.approx(1.0, abs=1e-6)
    assert (np.diff(scores) <= 0).all() and 112 not in searcher.search(images[112], 3, exclude=[112])[0]


def test_several_parts_search_as_one(corpus):
    codebook, images = corpus
    whole = asmk.AsmkSearcher(codebook, [asmk.AsmkPart.build(codebook, rows(images))])
    ids = sorted(images)
    parts = [asmk.AsmkPart.build(codebook, rows(images, ids[:4])), asmk.AsmkPart.build(codebook, rows(images, ids[4:]))]
    split = asmk.AsmkSearcher(codebook, parts)
    for query in (images[100][:8], images[121]):
        a, b = whole.search(query, 10), split.search(query, 10)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], rtol=1e-6)


def test_removed_images_are_never_returned_and_leave_no_trace(corpus):
    codebook, images = corpus
    removed = [100, 112, 127]
    parts = [asmk.AsmkPart.build(codebook, rows(images, sorted(images)[:5])),
             asmk.AsmkPart.build(codebook, rows(images, sorted(images)[5:]))]
    tombstoned = asmk.AsmkSearcher(codebook, parts, removed=np.array(removed))
    rebuilt = asmk.AsmkSearcher(codebook, [asmk.AsmkPart.build(
        codebook, rows(images, [i for i in sorted(images) if i not in removed]))])
    assert len(tombstoned) == 7
    for query in (images[100], images[112][:5], images[115]):
        ids, scores = tombstoned.search(query, 20)
        assert not set(ids.tolist()) & set(removed)
        expected = literal_scores(query, images, codebook.words, asmk.AsmkConfig(), removed=removed)
        np.testing.assert_allclose(scores, [expected[i] for i in ids.tolist()], rtol=1e-5)
        again = rebuilt.search(query, 20)
        np.testing.assert_array_equal(ids, again[0])


def test_parts_and_codebook_survive_a_round_trip(corpus):
    codebook, images = corpus
    part = asmk.AsmkPart.build(codebook, rows(images))
    back = asmk.AsmkPart.from_bytes(part.to_bytes())
    for name in ("image_ids", "offsets", "images", "signatures"):
        np.testing.assert_array_equal(getattr(part, name), getattr(back, name))
    config = asmk.AsmkConfig(words=6, query_assignment=3)
    words, loaded = asmk.load(asmk.save(codebook, config))
    np.testing.assert_array_equal(words.words, codebook.words)
    assert loaded == config


def test_a_part_of_another_codebook_is_refused(corpus):
    codebook, images = corpus
    part = asmk.AsmkPart.build(codebook, rows(images))
    with pytest.raises(ValueError, match="words"):
        asmk.AsmkSearcher(asmk.Codebook(codebook.words[:4]), [part])


def test_image_ids_near_two_to_the_63_are_kept_exactly(corpus):
    codebook, images = corpus
    big = {2 ** 63 - 1 - i: x for i, x in images.items()}  # ids are 64-bit hashes
    part = asmk.AsmkPart.build(codebook, rows(big))
    small = asmk.AsmkPart.build(codebook, rows(images))
    assert part.image_ids.tolist() == sorted(big)
    ids, _ = asmk.AsmkSearcher(codebook, [part]).search(images[106], 1)
    assert ids.tolist() == [2 ** 63 - 1 - 106] and part.entries == small.entries
