"""pipeline.landmarks end to end on a tiny versioned index of sample photographs, some geotagged by
the test (Pillow writes their EXIF): the outputs, GPS in the image table, the ground truth that
pipeline.evaluate reads, a version without a neighbour table, and ids kept across runs."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, TiffImagePlugin

from delf_retrieval.corpus import gps
from delf_retrieval.index import segment_reader
from delf_retrieval.landmarks import table
from delf_retrieval.query import evaluation
from tests.conftest import SAMPLES, reindex_run

R = TiffImagePlugin.IFDRational
PARIS = (48.8867, 2.3431)
LUND = (55.7047, 13.1910)
ROME = (41.9028, 12.4964)


def dms(value: float):
    value = abs(value)
    d = int(value)
    m = int((value - d) * 60)
    return (R(d, 1), R(m, 1), R(int(round(((value - d) * 60 - m) * 60 * 100)), 100))


def copy_with_gps(source: str, target, where) -> None:
    image = Image.open(source)
    image.thumbnail((640, 640))
    exif = Image.Exif()
    if where is not None:
        exif[gps.GPS_IFD] = {1: "N" if where[0] >= 0 else "S", 2: dms(where[0]),
                             3: "E" if where[1] >= 0 else "W", 4: dms(where[1])}
    os.makedirs(os.path.dirname(target), exist_ok=True)
    image.convert("RGB").save(target, "JPEG", quality=90, exif=exif)


PICKS = {  # corpus name: (sample scene, index, GPS)
    **{f"sacre/{i}.jpg": ("sacre_coeur", i, PARIS if i < 3 else None) for i in range(5)},
    **{f"lund/{i}.jpg": ("lund_street", i, LUND if i < 2 else None) for i in range(5)},
    "lund/far.jpg": ("lund_street", 5, ROME),  # a look-alike photo that says it was taken in Rome
    "berlin/0.jpg": ("berlin_cathedral", 0, None),
}


def make_corpus(folder):
    for name, (scene, i, where) in PICKS.items():
        copy_with_gps(os.path.join(SAMPLES, scene, sorted(os.listdir(os.path.join(SAMPLES, scene)))[i]),
                      folder / name, where)
    return folder


@pytest.fixture(scope="module")
def geotagged(tmp_path_factory, cache_dir):
    base = tmp_path_factory.mktemp("landmarks")
    corpus = make_corpus(base / "corpus")
    assert reindex_run(corpus, base / "index") == 0
    return corpus, base / "index"


def run_landmarks(root, *extra):
    from pipeline import landmarks

    return landmarks.run(["--index", str(root), "--min-inliers", "10", *extra])


def by_name(found, corpus):
    return {os.path.relpath(u, corpus): int(l) for u, l in zip(found.uris, found.landmarks)}


def test_the_image_table_has_the_exif_gps(geotagged):
    corpus, root = geotagged
    images = segment_reader.open_reader(str(root)).images.to_pylist()
    where = {os.path.relpath(r["uri"], corpus): (r["latitude"], r["longitude"]) for r in images}
    assert where["sacre/0.jpg"] == pytest.approx(PARIS, abs=1e-3)
    assert where["lund/far.jpg"] == pytest.approx(ROME, abs=1e-3)
    assert where["sacre/4.jpg"] == (None, None) and where["berlin/0.jpg"] == (None, None)


def test_landmarks_job_writes_its_outputs(geotagged, tmp_path):
    corpus, root = geotagged
    assert run_landmarks(root, "--output", str(tmp_path / "out")) == 0
    manifest = json.loads((root / "landmarks.json").read_text())
    found = table.load(str(root), manifest["index_id"])
    names = by_name(found, corpus)
    sacre = {names[f"sacre/{i}.jpg"] for i in range(5)}
    assert len(sacre) == 1 and -1 not in sacre
    assert names["lund/0.jpg"] == names["lund/1.jpg"] != -1 and names["lund/0.jpg"] not in sacre
    # Lund's untagged photos follow their strongest matches; the photo tagged 1,700 km away in Rome
    # shares no landmark with those tagged in Lund, whatever its matches
    assert names["lund/far.jpg"] != names["lund/0.jpg"]
    assert names["berlin/0.jpg"] == -1  # a one-off photo
    rows = pq.read_table(tmp_path / "out" / "landmarks.parquet").to_pylist()
    assert len(rows) == len(PICKS) and set(rows[0]) == {"uri", "image_id", "landmark", "score"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    paris = next(s for s in summary["summary"] if s["landmark"] == names["sacre/0.jpg"])
    assert paris["size"] == 5 and paris["geotagged"] == 3
    assert (paris["latitude"], paris["longitude"]) == pytest.approx(PARIS, abs=1e-3) and paris["radius_km"] < 0.01
    assert paris["representative"] in paris["members"]
    truth = evaluation.parse_ground_truth(json.loads((tmp_path / "out" / "ground_truth.json").read_text()))
    query = str(corpus / "sacre/0.jpg")
    assert truth[query].positives == {str(corpus / f"sacre/{i}.jpg") for i in range(1, 5)}
    sheets = sorted(os.listdir(tmp_path / "out" / "sheets"))
    assert len(sheets) == len(summary["summary"]) and Image.open(tmp_path / "out" / "sheets" / sheets[0]).size[0] > 300


def test_a_query_reports_its_landmark(geotagged):
    import delf_retrieval as delf
    from pipeline import search

    corpus, root = geotagged
    assert run_landmarks(root) == 0
    names = by_name(table.load(str(root)), corpus)
    index = delf.open_index(str(root))
    try:
        answer = index.answer(str(corpus / "sacre/1.jpg"))
    finally:
        index.stop()
    assert answer.landmark.landmark == names["sacre/1.jpg"] and answer.landmark.confidence > 0
    out = root.parent / "results.json"
    assert search.run(["--index", str(root), "--output", str(out), str(corpus / "sacre/2.jpg")]) == 0
    record = json.loads(out.read_text())["results"][0]
    assert record["landmark"]["landmark"] == names["sacre/2.jpg"] and record["landmark"]["confidence"] > 0
    assert evaluation.parse_results(json.loads(out.read_text()))  # pipeline.evaluate reads it as before


def test_ids_persist_across_runs(geotagged, tmp_path):
    import shutil

    corpus, root = geotagged
    assert run_landmarks(root) == 0
    first = by_name(table.load(str(root)), corpus)
    # A nightly run drops sacre/4: its landmark keeps its id, the others too
    work = tmp_path / "index"
    shutil.copytree(root, work)
    os.remove(corpus / "sacre/4.jpg")
    try:
        assert reindex_run(corpus, work, "--landmarks") == 0  # the nightly run finds the new version's landmarks
    finally:
        copy_with_gps(os.path.join(SAMPLES, "sacre_coeur", sorted(os.listdir(os.path.join(SAMPLES, "sacre_coeur")))[4]),
                      corpus / "sacre/4.jpg", None)
    assert json.loads((work / "landmarks.json").read_text())["index_id"] == json.loads(
        (work / "manifest.json").read_text())["index_id"]
    assert run_landmarks(work) == 0  # again with this test's threshold
    second = by_name(table.load(str(work)), corpus)
    assert "sacre/4.jpg" not in second
    assert all(second[name] == first[name] for name in second if first[name] >= 0)
    assert len(os.listdir(work / "landmarks")) == 1  # the previous version's files are gone


def test_a_version_without_a_neighbour_table_is_searched(tmp_path, cache_dir):
    corpus = make_corpus(tmp_path / "corpus")
    assert reindex_run(corpus, tmp_path / "index", "--verified-neighbours", "0") == 0
    assert json.loads((tmp_path / "index" / "manifest.json").read_text())["files"].get("neighbours") is None
    assert run_landmarks(tmp_path / "index") == 0
    names = by_name(table.load(str(tmp_path / "index")), corpus)
    assert len({names[f"sacre/{i}.jpg"] for i in range(5)}) == 1 and names["sacre/0.jpg"] >= 0


def test_one_clear_error_line_for_an_index_that_is_not_there(tmp_path, capsys):
    from pipeline import cli, landmarks

    assert cli.main(landmarks.run, ["--index", str(tmp_path / "nothing")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[0].startswith("python -m pipeline.landmarks: error:") and "Traceback" not in "".join(err)
    assert cli.main(landmarks.run, ["--index", str(tmp_path), "--min-support", "3"]) == 2


def test_the_service_reports_the_landmark_and_lists_landmarks(geotagged):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from delf_retrieval.query import live
    from pipeline.service.app import Service
    from pipeline.service.config import ServeConfig

    corpus, root = geotagged
    assert run_landmarks(root) == 0
    names = by_name(table.load(str(root)), corpus)
    following = live.LiveIndex(str(root), interval=3600)
    assert following.poll() == "switched"
    service = Service(ServeConfig(index=str(root), workers=1, request_timeout=180.0), live=following)
    with TestClient(service.app) as http:
        with open(corpus / "sacre/3.jpg", "rb") as f:
            answer = http.post("/v1/search", files={"image": ("q.jpg", f.read(), "image/jpeg")}).json()
        assert answer["landmark"]["landmark"] == names["sacre/3.jpg"] and answer["landmark"]["confidence"] > 0
        listed = http.get("/v1/landmarks").json()["landmarks"]
        assert {l["landmark"] for l in listed} == {v for v in names.values() if v >= 0}
        members = http.get(f"/v1/landmarks/{names['sacre/0.jpg']}").json()["members"]
        assert {m["uri"] for m in members} == {str(corpus / f"sacre/{i}.jpg") for i in range(5)}
        assert http.get("/v1/landmarks/999999").status_code == 404
        assert http.get("/v1/landmarks/x%2F..").status_code == 404
        assert "landmarks-view" in http.get("/").text
    following.stop()
