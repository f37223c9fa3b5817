"""The service's connections on a real loopback socket (uvicorn, as pipeline.serve runs it): idle and
dripping sockets are closed after the header timeout and never keep a real client from an answer,
a flood of idle sockets is cut back to the connection cap, requests beyond the limit are 503, the
metrics' labels stay few, and a wrong start (no index, a busy port) is one line before anything loads."""

import contextlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("uvicorn")
from starlette.testclient import TestClient  # noqa: E402

from delf_retrieval.query.live import LiveIndex
from pipeline.serve import make_server  # noqa: E402
from pipeline.service import ServeConfig, Service  # noqa: E402
from pipeline.service.connections import listening_socket  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402


def unloaded_service(root, **settings) -> Service:
    """A service whose index is never loaded: /healthz and / answer, which is all these tests need."""
    return Service(ServeConfig(index=str(root), **settings), live=LiveIndex(str(root), interval=3600))


@contextlib.contextmanager
def running(service):
    """The service on uvicorn on a free loopback port, in a thread; yields the port."""
    sock = listening_socket("127.0.0.1", 0)
    server = make_server(service, access_log=False)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def get(port: int, path: str = "/healthz", timeout: float = 5) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (whatever it sent before)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            if sock.recv(4096) == b"":
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_idle_and_dripping_sockets_are_closed_after_the_header_timeout_and_keep_no_one_out(tmp_path):
    timeout = 1.5
    service = unloaded_service(tmp_path, header_timeout=timeout, max_requests=4, keep_alive_timeout=30)
    with running(service) as port:
        idle = [connect(port) for _ in range(200)]  # far more than max_requests
        dripping = [connect(port) for _ in range(10)]
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        stop = threading.Event()

        def drip():
            for i in range(len(head)):
                for s in dripping:
                    with contextlib.suppress(OSError):
                        s.send(head[i:i + 1])
                if stop.wait(0.1):
                    return

        dripper = threading.Thread(target=drip, daemon=True)
        opened = time.monotonic()
        dripper.start()
        try:
            start = time.monotonic()
            assert get(port) == 200  # at once: idle sockets are no requests
            assert time.monotonic() - start < 1.0
            assert all(closed_within(s, timeout + 1.5 - (time.monotonic() - opened)) for s in dripping)
            assert all(closed_within(s, 0.5) for s in idle)
            assert time.monotonic() - opened >= timeout - 0.1  # not before their time
            assert get(port) == 200
        finally:
            stop.set()
            for s in idle + dripping:
                s.close()


def test_a_keep_alive_connection_is_closed_when_idle_and_its_next_request_is_timed_too(tmp_path):
    service = unloaded_service(tmp_path, header_timeout=1.0, keep_alive_timeout=30)
    with running(service) as port:
        with connect(port) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request's head, never finished
            assert closed_within(s, 2.5)


def test_past_the_connection_cap_the_longest_idle_sockets_are_closed(tmp_path):
    service = unloaded_service(tmp_path, header_timeout=60, max_connections=20)
    with running(service) as port:
        flood = [connect(port) for _ in range(60)]
        try:
            assert get(port) == 200
            closed = sum(closed_within(s, 0.2) for s in flood[:40])
            assert closed >= 35, closed  # the oldest went first, long before the header timeout
        finally:
            for s in flood:
                s.close()


def test_requests_beyond_the_limit_are_503_but_probes_answer(tmp_path):
    service = unloaded_service(tmp_path, max_requests=3)
    with TestClient(service.app) as http:
        service.in_flight = 3  # three requests being answered
        try:
            busy = http.get("/")
            assert (busy.status_code, busy.json()["error"]) == (503, "busy") and busy.headers["retry-after"]
            assert http.get("/healthz").status_code == 200
        finally:
            service.in_flight = 0
        assert http.get("/").status_code == 200


def test_metrics_labels_stay_few_whatever_methods_and_paths_clients_invent(tmp_path):
    service = unloaded_service(tmp_path, token="t0ken")
    with TestClient(service.app) as http:
        auth = {"Authorization": "Bearer t0ken"}

        def invent(first, last):
            for i in range(first, last):
                http.request(f"INVENTED{i}", f"/no/such/path/{i}")
                http.request(f"X{i}", "/healthz")
            return http.get("/metrics", headers=auth).text

        http.get("/metrics", headers=auth)
        before = len(invent(0, 10))  # each kind of answer seen once (the scrape too): its series exist
        metrics = invent(10, 300)
        assert "INVENTED" not in metrics and "/no/such" not in metrics
        assert 'delf_http_requests_total{method="other",route="unmatched",status="401"} 300.0' in metrics
        assert 'delf_http_requests_total{method="other",route="/healthz",status="405"} 300.0' in metrics
        assert len(metrics) < before + 200, len(metrics) - before  # counts grew, series did not


def serve_command(*argv):
    return subprocess.run([sys.executable, "-m", "pipeline.serve", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": REPO_ROOT}, timeout=120)


def test_a_missing_index_or_a_busy_port_is_a_one_line_error_before_anything_loads(built, tmp_path):
    missing = serve_command("--index", str(tmp_path / "nothing-here"), "--port", "0")
    assert missing.returncode == 2 and "no index is published there" in missing.stderr.splitlines()[0]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        start = time.monotonic()
        taken = serve_command("--index", str(built[1]), "--port", str(port))
    assert taken.returncode == 2, taken.stderr
    assert taken.stderr.splitlines()[0] == (f"python -m pipeline.serve: error: cannot listen on 127.0.0.1:{port}: "
                                            "Address already in use")
    assert time.monotonic() - start < 30 and "Traceback" not in taken.stderr  # the network was never loaded
    bad = serve_command("--index", str(built[1]), "--port", "0", "--allow-url", "ftp://x")
    assert bad.returncode == 2 and "--allow-url ftp://x" in bad.stderr
