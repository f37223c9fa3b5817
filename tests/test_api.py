"""The Python API (docs/python-api.md): its examples run as written on a built index, every kind of
query gives the same answer, several threads get what one gets, and pipeline.search answers
through it."""

from __future__ import annotations

import io
import json
import re
import threading

import numpy as np
import pytest
from PIL import Image

import delf_retrieval as delf
from pipeline import search
from tests.conftest import REPO_ROOT, sample_path

PHOTO = sample_path("berlin_cathedral", "02.jpg")


def doc_examples() -> list[str]:
    text = open(f"{REPO_ROOT}/docs/python-api.md", encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.fixture(scope="module")
def index(built):
    return delf.open_index(str(built[1]))


def summary(hits):
    return [(h.uri, round(float(h.score), 6), h.inliers, h.votes) for h in hits]


def test_the_documented_examples_run_as_written(built, capsys):
    examples = doc_examples()
    assert len(examples) == 3
    session: dict = {}  # one namespace, as a user's session runs the page top to bottom
    for code in examples:
        code = code.replace('"output/sample-index"', repr(str(built[1]))).replace('"photo.jpg"', repr(PHOTO))
        exec(compile(code, "docs/python-api.md", "exec"), session)
    printed = capsys.readouterr().out
    assert "berlin/a.jpg" in printed


def test_a_path_bytes_a_pil_image_and_an_array_give_one_answer(index):
    data = open(PHOTO, "rb").read()
    picture = Image.open(io.BytesIO(data))
    expected = summary(index.search(PHOTO, top=3))
    assert expected and expected[0][0].endswith("berlin/a.jpg")
    array = delf.to_rgb(PHOTO)
    for query in (data, picture, array):
        assert summary(index.search(query, top=3)) == expected
    assert [summary(h) for h in index.search([PHOTO, data], top=3)] == [expected, expected]


def test_options_are_the_command_lines_and_unknown_ones_are_refused(index):
    assert len(index.search(PHOTO, top=1)) == 1
    by_inliers = index.search(PHOTO, rank_by="inliers")
    assert [h.score for h in by_inliers] == [float(h.inliers) if h.inliers >= 4 else 0.0 for h in by_inliers]
    with pytest.raises(TypeError, match="unknown search options: colour"):
        index.search(PHOTO, colour="red")
    with pytest.raises(ValueError, match="rank_by"):
        index.search(PHOTO, rank_by="luck")
    with pytest.raises(TypeError, match="not int"):
        index.search(3)


def test_searches_from_several_threads_equal_one_thread(index):
    expected = summary(index.search(PHOTO, top=5))
    answers = [None] * 4

    def ask(i):
        answers[i] = summary(index.search(PHOTO, top=5))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [expected] * 4


def test_pipeline_search_answers_what_the_api_answers(index, built, tmp_path):
    output = tmp_path / "results.json"
    argv = ["--index", str(built[1]), "--output", str(output), "--top", "3", PHOTO]
    assert search.run(argv) == 0
    written = json.loads(output.read_text())["results"][0]["matches"]
    assert [(m["uri"], m["inliers"], m["votes"]) for m in written] == \
        [(h.uri, h.inliers, h.votes) for h in index.search(PHOTO, top=3)]


def test_extract_gives_the_features_of_the_default_preset(lite_net):
    feats = delf.extract(PHOTO)
    assert len(feats) > 0 and feats.locations.shape == (len(feats), 2)
    assert feats.descriptors.shape[0] == len(feats) and feats.scales.shape == feats.scores.shape == (len(feats),)
    assert np.array_equal(delf.extract(open(PHOTO, "rb").read()).descriptors, feats.descriptors)
