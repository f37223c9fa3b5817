"""The service as users meet it: the real ``python -m pipeline.serve`` process on a free loopback
port over an index of sample photographs, following a real ``pipeline.reindex`` run and its
rollback; the web page driven in headless Chromium; SIGTERM draining the queries in flight."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from delf_retrieval.query import engine
from tests.conftest import REPO_ROOT, SMALL, sample_path

httpx = pytest.importorskip("httpx2")

QUERY = sample_path("berlin_cathedral", "02.jpg")  # not in the index: its scene is (berlin/a.jpg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m pipeline.serve`` in a child process, its log in a file."""

    def __init__(self, root, log_path, *extra):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        argv = [sys.executable, "-m", "pipeline.serve", "--index", str(root), "--port", str(self.port),
                "--reload-interval", "0.5", "--workers", "1", "--max-queue", "6", "--no-access-log",
                "--request-timeout", "300", "--drain-timeout", "300", *extra]  # a loaded machine: no 504, no cut drain
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(argv, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT},
                                            stdout=log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.base, timeout=120)

    def log(self) -> str:
        return open(self.log_path).read()

    def ready(self, version: str | None = None, timeout: float = 240) -> dict:
        """/readyz once it is ready (serving ``version``, when given)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.process.poll() is None, f"the server exited:\n{self.log()[-3000:]}"
            try:
                answer = self.http.get("/readyz")
                if answer.status_code == 200 and version in (None, answer.json()["version"]):
                    return answer.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready (version {version}) after {timeout} s:\n{self.log()[-3000:]}")

    def search(self, path=QUERY, **options):
        with open(path, "rb") as f:
            return self.http.post("/v1/search", files={"image": (os.path.basename(path), f.read(), "image/jpeg")},
                                  data={k: str(v) for k, v in options.items()})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.http.close()


@pytest.fixture(scope="module")
def server(built, tmp_path_factory):
    """The server over a copy of the session's index root (the corpus is the session's, unchanged)."""
    corpus, index = built
    base = tmp_path_factory.mktemp("serve-process")
    shutil.copytree(index, base / "index")
    process = ServerProcess(base / "index", base / "server.log")
    yield process, corpus, base / "index"
    process.stop()


def reindex(*argv):
    result = subprocess.run([sys.executable, "-m", "pipeline.reindex", *argv], cwd=REPO_ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": REPO_ROOT}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_server_answers_and_follows_a_reindex_run_and_its_rollback(server):
    process, corpus, index = server
    first = process.ready()
    assert first["version"] == engine.published(str(index)).name and first["images"] == 4
    assert process.http.get("/healthz").json()["alive"] is True
    answer = process.search(top=3).json()
    assert answer["version"] == first["version"] and answer["matches"][0]["uri"].endswith("berlin/a.jpg")

    # The nightly run (nothing changed in the corpus: every row carried over) publishes a new version.
    assert "unchanged 4" in reindex("--input", str(corpus), "--index", str(index), *SMALL)
    second = engine.published(str(index)).name
    assert second != first["version"]
    assert process.ready(second, timeout=60)["images"] == 4
    again = process.search(top=3).json()
    assert again["version"] == second
    assert [m["uri"] for m in again["matches"]] == [m["uri"] for m in answer["matches"]]

    assert "now serves" in reindex("--index", str(index), "--rollback")
    assert process.ready(first["version"], timeout=60)
    assert process.search(top=1).json()["version"] == first["version"]
    assert "delf_index_reloads_total{outcome=\"switched\"} 3.0" in process.http.get("/metrics").text


def browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless Chromium is not installed (Debian's chromium and chromium-driver; .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,960", "--hide-scrollbars"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


LOADED = "return Array.from(document.querySelectorAll(arguments[0])).every(i => i.complete && i.naturalWidth > 0)"


def test_the_page_finds_the_scene_of_a_dropped_photo_in_headless_chromium(server, tmp_path, monkeypatch):
    process, _, _ = server
    ready = process.ready()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or a driver
    browser = browser_or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        browser.get(process.base + "/")
        wait = WebDriverWait(browser, 90)
        wait.until(lambda b: ready["version"] in b.find_element(By.ID, "version").text)
        assert f"{ready['images']} images" in browser.find_element(By.ID, "version").text
        browser.find_element(By.ID, "file").send_keys(QUERY)
        cards = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results .match"))
        assert "/berlin/" in cards[0].get_attribute("data-uri"), [c.get_attribute("data-uri") for c in cards]
        assert "inliers" in cards[0].text and "votes" in cards[0].text and "#1" in cards[0].text
        wait.until(lambda b: b.execute_script(LOADED, "#results .match img, #attention, #query-image"))
        assert "matches in" in browser.find_element(By.ID, "status").text
        cards[0].click()
        wait.until(lambda b: "open" in b.find_element(By.ID, "modal").get_attribute("class"))
        wait.until(lambda b: b.execute_script(LOADED, "#modal-image"))
        assert "inliers" in browser.find_element(By.ID, "modal-title").text
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        browser.quit()


def pool_state(process) -> tuple[float, float]:
    """(queries waiting, queries on a worker), from /metrics."""
    lines = process.http.get("/metrics").text.splitlines()
    return tuple(next(float(line.split()[1]) for line in lines if line.startswith(name + " "))
                 for name in ("delf_queue_depth", "delf_workers_busy"))


def test_sigterm_lets_the_queries_in_flight_finish_answers_new_ones_503_and_exits_0(server):
    process, _, _ = server  # the last test of the module: it stops the server
    process.ready()
    deadline = time.time() + 60
    while pool_state(process) != (0, 0):  # nothing left of earlier tests: the pool holds only the four below
        assert time.time() < deadline, f"the pool never emptied: {pool_state(process)}"
        time.sleep(0.05)
    answers = []
    queries = [threading.Thread(target=lambda: answers.append(process.search(top=1).status_code)) for _ in range(4)]
    for query in queries:
        query.start()
    # All four admitted: one on the worker, three waiting. Three waiting alone is not enough on a loaded
    # machine: the worker may not have taken the first yet while the fourth is still being sent, and a
    # query sent after SIGTERM is rightly refused.
    while pool_state(process) != (3, 1):
        assert time.time() < deadline, f"the queries never queued: {pool_state(process)}"
        time.sleep(0.02)
    process.process.send_signal(signal.SIGTERM)
    refused = process.http.get("/readyz")
    assert refused.status_code == 503 and refused.json()["reason"] == "shutting down"
    late = process.http.post("/v1/search", json={"url": "https://example.org/a.jpg"})
    assert late.status_code == 503 and late.json()["error"] == "shutting_down" and late.headers["retry-after"]
    for query in queries:
        query.join()
    assert answers == [200, 200, 200, 200]
    assert process.process.wait(timeout=60) == 0
    assert "draining: " in process.log() and "stopped" in process.log()
