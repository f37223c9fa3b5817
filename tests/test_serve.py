"""The query service through Starlette's test client: answers equal to pipeline.search's results.json,
typed 4xx for bad input while it keeps serving, the bounded queue (503) and the deadline (504),
the token, the metrics, a new version from a real pipeline.reindex run served while a query in
flight finishes on its own, and a damaged version never served."""

import gc
import io
import json
import os
import shutil
import socket
import struct
import threading
import time
import weakref
import zlib

import pytest
from PIL import Image

from delf_retrieval import storage
from delf_retrieval.index import layout, scrub, segments, versions
from delf_retrieval.query import engine, live
from pipeline import search
from tests.conftest import corpus_of, reindex_run, sample_path, serving
from tests.test_fuzz_decode import png_with_text_bomb

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from pipeline.service import ServeConfig, Service  # noqa: E402

QUERY = sample_path("berlin_cathedral", "02.jpg")  # not in the index: its scene is (berlin/a.jpg)


@pytest.fixture(scope="module")
def root(built, tmp_path_factory):
    """A copy of the session's small index root; these tests publish versions into it."""
    corpus, index = built
    base = tmp_path_factory.mktemp("serve")
    shutil.copytree(corpus, base / "corpus")
    shutil.copytree(index, base / "index")
    return base / "corpus", base / "index"


@pytest.fixture(scope="module")
def following(root):
    """The live index over the root, first version opened; the services below share it."""
    index = live.LiveIndex(str(root[1]), interval=3600)
    assert index.poll() == "switched"
    return index


def service_client(following, **settings):
    service = Service(ServeConfig(index=following.root, **settings), live=following)
    return service, TestClient(service.app)


@pytest.fixture(scope="module")
def client(following):
    # Two workers: a query held in flight (below) leaves one for the others; time for a re-index meanwhile.
    # Loopback test servers and the GCS emulator's queries/ are admitted, as --allow-url would.
    service, test_client = service_client(following, workers=2, max_queue=2, max_upload_bytes=2 << 20,
                                          request_timeout=180.0,
                                          allow_url=("http://127.0.0.1", "gs://test-bucket/queries/"))
    with test_client:
        yield service, test_client


def upload(client, path, **options):
    with open(path, "rb") as f:
        return client.post("/v1/search", files={"image": (os.path.basename(path), f.read(), "image/jpeg")},
                           data={k: str(v) for k, v in options.items()})


def upload_bytes(client, data, name="query.bin", **options):
    return client.post("/v1/search", files={"image": (name, data, "application/octet-stream")},
                       data={k: str(v) for k, v in options.items()})


def test_an_upload_is_answered_as_pipeline_search_answers_it(client, root, tmp_path):
    service, http = client
    response = upload(http, QUERY, top=3)
    assert response.status_code == 200, response.text
    answer = response.json()
    results = tmp_path / "results.json"
    assert search.run(["--index", str(root[1]), "--output", str(results), "--top", "3", QUERY]) == 0
    expected = json.loads(results.read_text())["results"][0]["matches"]
    assert [{k: m[k] for k in ("uri", "score", "inliers", "votes")} for m in answer["matches"]] == expected
    assert answer["matches"][0]["uri"].endswith("berlin/a.jpg") and answer["matches"][0]["inliers"] >= 20
    assert answer["version"] == engine.published(str(root[1])).name
    assert answer["timings"]["extract"] > 0 and answer["timings"]["search"] > 0
    assert answer["timings"]["total"] >= answer["timings"]["extract"] + answer["timings"]["search"]

    # The top match's record, thumbnail and the pictures of this query.
    best = answer["matches"][0]
    record = http.get(f"/v1/images/{best['image_id']}").json()
    assert record["uri"] == best["uri"] and record["image_id"] == best["image_id"]
    assert record["width"] == 640 and record["version"] == answer["version"]
    thumbnail = Image.open(io.BytesIO(http.get(best["thumbnail"]).content))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) == service.config.thumbnail_side
    one = Image.open(io.BytesIO(http.get(best["picture"]).content))
    every = Image.open(io.BytesIO(http.get(answer["picture"]).content))
    assert one.format == every.format == "PNG"
    assert every.height > one.height > 320  # the query row, then one row per match drawn
    attention = Image.open(io.BytesIO(http.get(answer["attention"]).content))
    assert attention.size == (640, 480)
    assert http.get(f"/v1/matches/{answer['query_id']}.png?rank=99").status_code == 404
    assert http.get("/v1/matches/0123456789abcdef.png").json()["error"] == "not_found"
    assert http.get("/v1/images/12345").status_code == 404


def pixel_bomb() -> bytes:
    """A PNG whose header declares 30000 x 30000 pixels (900 MP) around a tiny body."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    png = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", 30000, 30000) + bytes(png[24:29])
    png[16:29] = ihdr
    png[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(png)


def test_bad_input_gets_a_typed_4xx_and_the_server_keeps_serving(client):
    service, http = client
    photo = open(QUERY, "rb").read()
    cases = {
        "empty": (upload_bytes(http, b""), 400),
        "corrupt": (upload_bytes(http, os.urandom(5000)), 400),
        "truncated": (upload_bytes(http, photo[: len(photo) // 3]), 400),
        "too_large": (upload_bytes(http, pixel_bomb()), 413),
        "unsupported": (upload_bytes(http, b"%PDF-1.4\n" + os.urandom(2000)), 415),
    }
    for reason, (response, status) in cases.items():
        assert (response.status_code, response.json()["error"]) == (status, reason), response.text
    text_bomb = upload_bytes(http, png_with_text_bomb())  # 50 MB of metadata from ~50 KB
    assert (text_bomb.status_code, text_bomb.json()["error"]) == (413, "too_large")
    body = upload_bytes(http, os.urandom(3 << 20))  # over this service's 2 MB cap
    assert (body.status_code, body.json()["error"]) == (413, "too_large")
    for options, words in (({"top": 0}, "top must be"), ({"top": 5000}, "at most 1000"), ({"top": "x"}, "must be int"),
                           ({"rank_by": "magic"}, "rank_by"), ({"colour": "red"}, "unknown option")):
        response = upload(http, QUERY, **options)
        assert response.status_code == 400 and words in response.json()["detail"], response.text
    as_json = {"content-type": "application/json"}
    assert http.post("/v1/search", content=b"{", headers=as_json).json()["error"] == "bad_json"
    assert http.post("/v1/search", json={"url": "/etc/passwd"}).json()["error"] == "bad_url"
    assert http.post("/v1/search", json={"url": "http://127.0.0.1:9/x.jpg", "top": True}).json()["error"] \
        == "bad_option"
    assert http.post("/v1/search", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert http.get("/v1/search").status_code == 405
    # Still serving: a URL query (the build's fetcher) answers as the upload did.
    with serving(os.path.dirname(os.path.dirname(QUERY))) as (base, _):
        answer = http.post("/v1/search", json={"url": f"{base}/berlin_cathedral/02.jpg", "top": 2})
    assert answer.status_code == 200 and answer.json()["matches"][0]["uri"].endswith("berlin/a.jpg")
    assert http.get("/readyz").json()["ready"] is True


def test_a_full_queue_is_503_with_retry_after_and_a_late_answer_504(following, monkeypatch):
    gate = threading.Event()
    service, http = service_client(following, workers=1, max_queue=1, request_timeout=3.0)
    answer = service._answer

    def held(*args):
        gate.wait(10)
        return answer(*args)

    monkeypatch.setattr(service, "_answer", held)
    statuses = []
    with http:
        def ask():
            statuses.append(upload_bytes(http, b"not an image").status_code)

        first, second = threading.Thread(target=ask), threading.Thread(target=ask)
        first.start()
        while service.queries.running < 1:
            time.sleep(0.01)
        second.start()
        while service.queries.waiting < 1:
            time.sleep(0.01)
        refused = upload_bytes(http, b"not an image")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == "queue_full"
        metrics = http.get("/metrics").text
        assert "delf_queue_depth 1.0" in metrics and "delf_workers_busy 1.0" in metrics
        first.join(), second.join()  # both pass the 3 s deadline held at the gate
        assert statuses == [504, 504]
        gate.set()
        deadline = time.time() + 10
        while service.queries.running and time.time() < deadline:  # the held worker ends, its answer unsent
            time.sleep(0.01)
        assert service.queries.running == service.queries.waiting == 0
        assert upload_bytes(http, b"not an image").status_code == 400  # the worker is free again


def test_a_url_that_never_answers_is_504_and_frees_its_worker(following):
    service, http = service_client(following, workers=1, request_timeout=2.0, allow_url=("http://127.0.0.1",))
    with socket.socket() as silent, http:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # accepts connections, never answers
        start = time.monotonic()
        response = http.post("/v1/search", json={"url": f"http://127.0.0.1:{silent.getsockname()[1]}/a.jpg"})
        assert (response.status_code, response.json()["error"]) == (504, "deadline")
        assert time.monotonic() - start < 4
        deadline = time.monotonic() + 3  # the fetch itself is held to the request's deadline
        while service.queries.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.queries.running == 0


def test_a_gs_url_is_read_as_the_build_reads_it(client, gcs_emulator):
    _, http = client
    storage.write_bytes(f"{gcs_emulator}/queries/berlin.jpg", open(QUERY, "rb").read())
    answer = http.post("/v1/search", json={"url": f"{gcs_emulator}/queries/berlin.jpg", "top": 1})
    assert answer.status_code == 200 and answer.json()["matches"][0]["uri"].endswith("berlin/a.jpg")
    missing = http.post("/v1/search", json={"url": f"{gcs_emulator}/queries/absent.jpg"})
    assert (missing.status_code, missing.json()["error"]) == (422, "fetch_failed")
    assert missing.json()["detail"] == f"could not fetch {gcs_emulator}/queries/absent.jpg"
    outside = http.post("/v1/search", json={"url": f"{gcs_emulator}/other/berlin.jpg"})
    assert (outside.status_code, outside.json()["error"]) == (400, "url_refused")


def test_by_default_a_url_query_reaches_only_public_addresses(following):
    _, http = service_client(following)
    with serving(os.path.dirname(os.path.dirname(QUERY))) as (base, _), http:
        port = base.rsplit(":", 1)[1]
        for host in ("127.0.0.1", "2130706433", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]", "localhost"):
            refused = http.post("/v1/search", json={"url": f"http://{host}:{port}/berlin_cathedral/02.jpg"})
            assert (refused.status_code, refused.json()["error"]) == (400, "url_refused"), refused.text
        assert http.post("/v1/search", json={"url": "gs://test-bucket/queries/a.jpg"}).json()["error"] == "url_refused"


def test_the_token_guards_everything_but_the_page_and_healthz(following):
    _, http = service_client(following, token="s3cret-token")
    with http:
        assert http.get("/healthz").status_code == 200
        assert "<title>DELF landmark retrieval</title>" in http.get("/").text
        for path in ("/readyz", "/metrics", "/v1/images/1"):
            response = http.get(path)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert http.get("/readyz", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert upload_bytes(http, b"x").status_code == 401
        assert http.get("/readyz", headers={"Authorization": "Bearer s3cret-token"}).json()["ready"] is True


def test_metrics_count_answers_by_status_and_name_the_version(client):
    _, http = client
    metrics = http.get("/metrics").text
    version = engine.published(client[0].config.index).name
    assert f'delf_index_version_info{{index_id="{client[0].live.engine.version.index_id}",version="{version}"}} 1.0' \
        in metrics
    assert 'delf_http_requests_total{method="POST",route="/v1/search",status="200"}' in metrics
    assert 'delf_http_requests_total{method="POST",route="/v1/search",status="413"}' in metrics
    assert 'delf_query_stage_seconds_bucket{le="4.0",stage="extract"}' in metrics
    assert 'delf_http_request_seconds_count{route="/v1/search"}' in metrics
    assert "process_resident_memory_bytes" in metrics and 'delf_index_size{of="images"} 4.0' in metrics


def test_a_reindexed_version_is_served_while_a_query_in_flight_finishes_on_its_own(client, root, following,
                                                                                monkeypatch):
    service, http = client
    old = following.engine
    gate, started = threading.Event(), threading.Event()
    answer = old.answer

    def held(*args, **kwargs):
        started.set()
        gate.wait(60)
        return answer(*args, **kwargs)

    monkeypatch.setattr(old, "answer", held)
    in_flight = []
    query = threading.Thread(target=lambda: in_flight.append(upload(http, QUERY)))
    query.start()
    assert started.wait(30)

    corpus, index = root  # a copy of the session's corpus: its photographs are new to the index and extracted
    corpus_of(corpus, {"berlin/c.jpg": ("berlin_cathedral", 1)})  # and the query photograph itself
    assert reindex_run(corpus, index) == 0
    assert following.poll() == "switched"
    new = following.engine
    assert new.version != old.version and new.extractor is old.extractor  # same network, not loaded again
    assert http.get("/readyz").json()["version"] == new.version.name == engine.published(str(index)).name
    fresh = upload(http, QUERY).json()
    assert fresh["version"] == new.version.name
    assert fresh["matches"][0]["uri"].endswith("berlin/c.jpg") and fresh["matches"][0]["inliers"] >= 250

    gate.set()
    query.join()
    late = in_flight[0].json()
    assert late["version"] == old.version.name  # finished on the version it started with
    assert not any(m["uri"].endswith("berlin/c.jpg") for m in late["matches"])
    assert following.poll() == "unchanged"
    # Once its last query is answered (the app's task ends just after its answer is sent), nothing holds
    # the old version.
    monkeypatch.undo()
    gone = weakref.ref(old)
    old = answer = held = None
    in_flight.clear()
    deadline = time.time() + 10
    while gone() is not None and time.time() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert gone() is None


def test_a_version_that_fails_to_open_is_not_served_and_the_serving_one_stays(client, root, following):
    service, http = client
    index = str(root[1])
    serving = following.engine.version
    pointer, token = versions.current(index)
    damaged = "builds/20990101T000000Z-damaged"
    shutil.copytree(os.path.join(index, pointer["build"]), os.path.join(index, damaged))
    # Same size, one byte flipped: its tombstones, checked by SHA-256 on open.
    tombstones = os.path.join(index, damaged,
                              layout.read_manifest(os.path.join(index, damaged))["files"]["tombstones"]["path"])
    data = bytearray(open(tombstones, "rb").read())
    data[len(data) // 3] ^= 0xFF
    open(tombstones, "wb").write(bytes(data))
    own = layout.read_manifest(os.path.join(index, damaged))
    storage.write_bytes_if(os.path.join(index, layout.MANIFEST),
                           json.dumps(versions.pointer_from_version(own, damaged)).encode(), token)
    try:
        assert following.poll() == "failed"
        assert following.engine.version == serving
        ready = http.get("/readyz").json()
        assert ready["version"] == serving.name and "SHA-256" in ready["last_error"]
        assert following.poll() == "failed"  # remembered: not opened again
        assert list(following.failed()) == ["20990101T000000Z-damaged"]
        assert 'delf_index_reloads_total{outcome="failed"} 1.0' in http.get("/metrics").text
        assert 'delf_index_reloads_total{outcome="switched"} 2.0' in http.get("/metrics").text
        assert upload_bytes(http, b"").json()["error"] == "empty"  # still answering
    finally:
        storage.write_bytes(os.path.join(index, layout.MANIFEST), json.dumps(pointer).encode())
    assert following.poll() == "unchanged"


def hostile_requests(query_id: str):
    """(name, method, path, request kwargs) of inputs that must each get a 4xx, on every route."""
    huge = "9" * 5000
    nested = b"[" * 100_000 + b"]" * 100_000
    refused = "http://10.0.0.1/a.jpg"  # never fetched: refused by the policy before any connection
    as_json = {"headers": {"content-type": "application/json"}}

    def raw(options: bytes) -> dict:
        return {"content": b'{"url": "' + refused.encode() + b'", ' + options + b"}", **as_json}

    cases = [
        ("image id of 5000 digits", "GET", f"/v1/images/{huge}", {}),
        ("thumbnail of 5000 digits", "GET", f"/v1/images/{huge}/thumbnail", {}),
        ("image id past 63 bits", "GET", "/v1/images/18446744073709551616", {}),
        ("negative image id", "GET", "/v1/images/-1", {}),
        ("image id not a number", "GET", "/v1/images/%F0%9F%98%80", {}),
        ("long query id", "GET", f"/v1/matches/{'a' * 5000}.png", {}),
        ("rank in superscript", "GET", f"/v1/matches/{query_id}.png?rank=%C2%B2", {}),
        ("rank of 30 digits", "GET", f"/v1/matches/{query_id}.png?rank={'9' * 30}", {}),
        ("rank negative", "GET", f"/v1/matches/{query_id}.png?rank=-1", {}),
        ("attention of nothing", "GET", "/v1/attention/%00.png", {}),
        ("JSON nested 100k deep", "POST", "/v1/search", {"content": nested, **as_json}),
        ("JSON of 5000-digit number", "POST", "/v1/search", raw(b'"seed": ' + huge.encode())),
        ("JSON not UTF-8", "POST", "/v1/search", {"content": b'{"url": "\xff\xfe"}', **as_json}),
        ("JSON Infinity", "POST", "/v1/search", raw(b'"max_distance": 1e999')),
        ("JSON NaN", "POST", "/v1/search", raw(b'"vote_weight": NaN')),
        ("url of 100k characters", "POST", "/v1/search", {"json": {"url": "http://" + "a" * 100_000 + "/x.jpg"}}),
        ("url with a newline", "POST", "/v1/search", {"json": {"url": "http://example.org/a\r\nHost: x"}}),
        ("url of another scheme", "POST", "/v1/search", {"json": {"url": "file:///etc/passwd"}}),
        ("unknown option of 10k characters", "POST", "/v1/search", {"json": {"url": refused, "x" * 10_000: 1}}),
        ("rank_by of 10k characters", "POST", "/v1/search", {"json": {"url": refused, "rank_by": "x" * 10_000}}),
        ("option as a list", "POST", "/v1/search", {"json": {"url": refused, "top": [1] * 1000}}),
        ("form without image", "POST", "/v1/search", {"data": {"top": "3"}, "files": {"other": ("a", b"x")}}),
    ]
    bad_values = {"nprobe": [-5, 0, 257], "seed": [1e23, 10**23, -1, 2**32], "top": [0, 10**30, -1],
                  "neighbours": [0, 101], "shortlist": [-1, 1001], "expand": [-1, 101], "expand_min_inliers": [0],
                  "min_inliers": [-1, 10**9], "max_distance": [-1.0, 0, 100.0],
                  "residual_threshold": [0, -3.0, 1e12], "vote_weight": [-1.0, 1e300]}
    for name, values in bad_values.items():
        for value in values:
            cases.append((f"JSON {name}={value!r}", "POST", "/v1/search", {"json": {"url": refused, name: value}}))
            cases.append((f"form {name}={value!r}", "POST", "/v1/search",
                          {"data": {name: str(value)}, "files": {"image": ("q.jpg", b"not read", "image/jpeg")}}))
    for text in ("nan", "inf", "-inf", "1e400", "9" * 5000, "0x10", ""):
        cases.append((f"form seed={text[:10]!r}", "POST", "/v1/search",
                      {"data": {"seed": text}, "files": {"image": ("q.jpg", b"x", "image/jpeg")}}))
        cases.append((f"form max_distance={text[:10]!r}", "POST", "/v1/search",
                      {"data": {"max_distance": text}, "files": {"image": ("q.jpg", b"x", "image/jpeg")}}))
    return cases


def test_no_hostile_input_reaches_a_500_on_any_route(client):
    service, http = client
    query_id = upload(http, QUERY, top=1).json()["query_id"]
    answers = {}
    for name, method, path, kwargs in hostile_requests(query_id):
        response = http.request(method, path, **kwargs)
        answers[name] = (response.status_code, response.json()["error"] if response.content[:1] == b"{" else "")
    wrong = {name: answer for name, answer in answers.items() if not 400 <= answer[0] < 500}
    assert not wrong, wrong
    option_cases = [name for name in answers if name.startswith(("JSON ", "form ")) and "=" in name]
    assert all(answers[name] == (400, "bad_option") for name in option_cases), \
        {name: answers[name] for name in option_cases if answers[name] != (400, "bad_option")}
    nprobe = http.post("/v1/search", json={"url": "http://10.0.0.1/a.jpg", "nprobe": 0}).json()
    assert nprobe["detail"] == "nprobe must be at least 1"
    assert answers["JSON nested 100k deep"] == (400, "bad_json")
    assert answers["image id of 5000 digits"] == (404, "not_found")
    assert upload(http, QUERY, top=1).status_code == 200  # and it still serves


def test_a_damaged_segment_is_named_in_one_line_and_noted_for_the_next_run(built, tmp_path):
    """A row group that fails its CRC-32: the version is refused when its probe reads it, /readyz and
    the log name the segment in one line, and a note is left for the nightly run that repairs it."""
    root = tmp_path / "index"
    shutil.copytree(built[1], root)
    (ref,) = segments.segment_refs(layout.read_manifest(str(root)))
    shard = segments.read_segment(str(root), ref).shards[0]
    path = root / ref.folder / shard["path"]
    data = bytearray(path.read_bytes())
    group = shard["row_groups"][0]
    for i in range(group["offset"] + 16, group["offset"] + 24):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    index = live.LiveIndex(str(root), engine.EngineConfig(resident=False), interval=3600)
    assert index.poll() == "failed"
    assert f"segment {ref.segment_id} is damaged" in index.last_error and "\n" not in index.last_error
    assert scrub.noted_damage(str(root)) == {ref.segment_id}
    service = Service(ServeConfig(index=str(root)), live=index)
    with TestClient(service.app) as damaged:
        ready = damaged.get("/readyz")
        assert ready.status_code == 503 and f"segment {ref.segment_id} is damaged" in ready.json()["reason"]
        assert upload(damaged, QUERY).status_code == 503
