"""Near-duplicate groups in the first stage's shortlist: the compiled spread against a direct
greedy grouping on the exact cosines, its slots, the sketches' cosines against the vectors', and a
flood of copies of one look-alike that no longer pushes the true match out of the top K."""

import numpy as np

from delf_retrieval.first_stage import duplicates, search


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def reference(vectors, k, cosine, slots):
    """The spread written directly: groups by the first earlier leader at >= cosine."""
    leaders, members, kept, waiting = [], {}, [], []
    for i, v in enumerate(vectors):
        group = next((j for j in leaders if float(vectors[j] @ v) >= cosine), None)
        if group is None:
            leaders.append(i)
            group = i
        (kept if members.get(group, 0) < slots else waiting).append(i)
        members[group] = members.get(group, 0) + 1
    return (kept + waiting)[:k]


def copies_of(rng, centres, per, spread):
    """``per`` noisy copies of each centre (rows), in a random order."""
    out = np.concatenate([unit(c + rng.normal(0, spread, (per, len(c)))) for c in centres])
    return out[rng.permutation(len(out))]


def test_spread_matches_a_direct_greedy_grouping():
    rng = np.random.default_rng(0)
    for trial in range(5):
        centres = unit(rng.normal(size=(6, 32)))
        vectors = np.concatenate([copies_of(rng, centres, 15, 0.12), unit(rng.normal(size=(60, 32)))])
        vectors = vectors[rng.permutation(len(vectors))]
        for k, slots in ((20, 3), (60, 8), (150, 1), (500, 4)):
            got = duplicates.spread(vectors, k, cosine=0.7, slots=slots)
            assert got.tolist() == reference(vectors, k, 0.7, slots)[:min(k, len(vectors))]


def test_a_group_gets_its_slots_in_rank_order_and_the_rest_wait():
    rng = np.random.default_rng(1)
    groups = copies_of(rng, unit(rng.normal(size=(1, 64))), 20, 0.05)  # 20 copies of one photo, ranked first
    others = unit(rng.normal(size=(30, 64)))  # distinct photos after them
    ranking = np.concatenate([groups, others])
    got = duplicates.spread(ranking, 30, slots=5).tolist()
    assert got == list(range(5)) + list(range(20, 45))
    assert duplicates.spread(ranking, 50, slots=5).tolist() == list(range(5)) + list(range(20, 50)) + list(range(5, 20))
    assert duplicates.spread(ranking, 100, slots=5).tolist()[-15:] == list(range(5, 20))  # k past the ranking


def test_sketches_keep_cosines_and_are_the_same_in_every_process():
    rng = np.random.default_rng(2)
    base = unit(rng.normal(size=(200, 640)))
    near = unit(base + rng.normal(0, 0.04, base.shape))  # cosines near 0.7 with their base
    a, b = duplicates.sketches(base), duplicates.sketches(base.copy())
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float16 and a.shape == (200, duplicates.DIMS)
    np.testing.assert_allclose(np.linalg.norm(a.astype(np.float32), axis=1), 1, atol=2e-3)
    exact = (base * near).sum(1)
    sketched = (a.astype(np.float32) * duplicates.sketches(near).astype(np.float32)).sum(1)
    assert 0.5 < exact.mean() < 0.9
    assert np.abs(sketched - exact).mean() < 0.06
    assert np.abs(sketched - exact).max() < 0.25
    assert duplicates.sketches(base[:, :16]).shape == (200, 16)  # fewer dimensions than the sketch's


def first_stage(vectors):
    ids = np.arange(len(vectors), dtype=np.int64) * 10
    n = len(vectors)
    return search.FirstStage("/nowhere", None, None, ids, vectors, np.zeros(n, np.int32), np.zeros(n, np.int64),
                             np.zeros(n, np.int64), [])


def test_copies_of_one_look_alike_no_longer_fill_the_shortlist():
    rng = np.random.default_rng(3)
    query = unit(rng.normal(size=640))
    def orthogonal():
        x = rng.normal(size=640)
        return unit(x - (x @ query) * query)

    off = orthogonal()
    look_alike = unit(0.85 * query + np.sqrt(1 - 0.85 ** 2) * off)
    copies = copies_of(rng, look_alike[None], 300, 0.015)  # ~0.8 with the query, ~0.87 among themselves
    match = unit(0.55 * query + np.sqrt(1 - 0.55 ** 2) * orthogonal())  # ranked behind every copy
    vectors = np.concatenate([copies, match[None], unit(rng.normal(size=(200, 640)))])
    stage = first_stage(vectors)
    assert np.all(copies @ query > match @ query)
    match_id = 10 * len(copies)
    assert match_id not in stage.top_vectors(query[None], 100, slots=0)[0]
    top = stage.top_vectors(query[None], 100)[0]
    assert match_id in top[:duplicates.SLOTS + 1]
    assert len(top) == 100 and len(set(top.tolist())) == 100
