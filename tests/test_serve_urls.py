"""What a service query may fetch by URL: every spelling of a loopback, private or otherwise
non-public address refused before any connection, each redirect checked as the first, DNS asked
once and the checked address connected to, gs:// only under admitted prefixes, and errors that
never repeat the remote's status or reason."""

import contextlib
import http.server
import socket
import threading
import time

import pytest

from delf_retrieval.corpus import images, inputs
from pipeline.service.urls import AllowUrlError, ServiceFetcher, UrlPolicy, UrlRefused

NOT_PUBLIC = ["127.0.0.1", "2130706433", "0177.0.0.1", "127.1", "0x7f.0.0.1", "0x7f000001", "[::1]",
              "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0.0.0.0", "0", "[::]", "10.0.0.1", "0x0a000001",
              "192.168.1.1", "172.16.0.1", "100.64.0.1", "169.254.169.254", "[fe80::1]", "[fd00::1]", "224.0.0.1",
              "[ff02::1]", "240.0.0.1", "255.255.255.255", "198.18.0.1", "localhost", "[2002:7f00:1::]",
              "[64:ff9b::a00:1]", "127.0.0.1:8080", "[::ffff:10.0.0.1]:443"]
FETCH = inputs.FetchConfig(timeout=5, retries=0, backoff=0.01)


@pytest.fixture
def no_connections(monkeypatch):
    """Fails the test if anything connects a socket."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.mark.parametrize("host", NOT_PUBLIC)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_every_spelling_of_a_non_public_address_is_refused_before_connecting(no_connections, scheme, host):
    with pytest.raises(UrlRefused, match="^refused: "):
        ServiceFetcher(UrlPolicy(), FETCH).read(f"{scheme}://{host}/a.jpg")
    assert no_connections == []


@pytest.mark.parametrize("url", ["ftp://example.org/a.jpg", "file:///etc/passwd", "gs://bucket/a.jpg",
                                 "http://user:pw@example.org/a.jpg", "http://example.org:99999/a.jpg",
                                 "http://exa mple.org/a.jpg", "http:///a.jpg"])
def test_other_schemes_credentials_and_gs_are_refused(no_connections, url):
    with pytest.raises(UrlRefused, match="^refused: "):
        ServiceFetcher(UrlPolicy(), FETCH).read(url)


def test_gs_is_read_only_under_an_admitted_prefix():
    policy = UrlPolicy(("gs://queries-bucket/in/",))
    policy.check_gs("gs://queries-bucket/in/a.jpg")
    for url in ("gs://queries-bucket/other/a.jpg", "gs://queries-bucket/inside.jpg", "gs://other-bucket/in/a.jpg",
                "gs://queries-bucket/in/../secret.jpg", "gs://queries-bucket/in//a.jpg"):
        with pytest.raises(UrlRefused):
            policy.check_gs(url)


def test_allow_url_entries_admit_a_network_a_port_or_a_host_by_name():
    fixed = {"intranet.example": "10.1.2.3", "public.example": "93.184.216.34"}

    def resolve(host, port, type=None):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (fixed.get(host, host), port))]

    policy = UrlPolicy(("http://10.9.0.0/16", "https://127.0.0.1:8443", "https://intranet.example"))
    assert policy.check("http://10.9.8.7/a.jpg", resolve).addresses == ("10.9.8.7",)
    assert policy.check("https://127.0.0.1:8443/a.jpg", resolve).port == 8443
    assert policy.check("https://intranet.example/a.jpg", resolve).addresses == ("10.1.2.3",)
    assert policy.check("http://public.example/a.jpg", resolve).addresses == ("93.184.216.34",)
    for url in ("https://10.9.8.7/a.jpg", "http://10.8.0.1/a.jpg", "https://127.0.0.1:8444/a.jpg",
                "http://intranet.example/a.jpg", "http://192.168.0.1/a.jpg"):
        with pytest.raises(UrlRefused):
            policy.check(url, resolve)
    for entry in ("ftp://x", "http://host.example/8", "http://user@10.0.0.1", "gs://"):
        with pytest.raises(AllowUrlError):
            UrlPolicy((entry,))


class Hops(http.server.BaseHTTPRequestHandler):
    """Redirects and answers for the tests below; ``routes`` maps a path to (status, headers, body)."""

    routes: dict = {}
    hosts: list = []

    def do_GET(self):
        self.hosts.append(self.headers.get("Host"))
        status, headers, body = self.routes.get(self.path, (404, {}, b"no such path, SECRET-REASON"))
        self.send_response(status, "SECRET-REASON" if status >= 400 else None)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def hops(routes):
    handler = type("Handler", (Hops,), {"routes": routes, "hosts": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port, handler.hosts
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def untouched_listener():
    """A loopback port that is listening; yields (port, a function: whether anyone connected)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)

        def connected() -> bool:
            try:
                listener.accept()[0].close()
                return True
            except BlockingIOError:
                return False

        yield listener.getsockname()[1], connected


def test_a_redirect_chain_ending_on_a_refused_address_is_refused_before_it_is_reached():
    with untouched_listener() as (other, connected):
        routes = {"/image": (200, {}, b"the image"),
                  "/one": (302, {"Location": "/two"}, b""),
                  "/two": (301, {"Location": "/image"}, b""),
                  "/to-other-port": (302, {"Location": "/three"}, b""),
                  "/three": (307, {"Location": f"http://127.0.0.1:{other}/x"}, b""),
                  "/to-other-address": (302, {"Location": "http://0177.0.0.2:{port}/image"}, b""),
                  "/to-v6": (302, {"Location": "http://[::1]:{port}/image"}, b""),
                  "/to-gs": (302, {"Location": "gs://bucket/a.jpg"}, b""),
                  "/loop": (302, {"Location": "/loop"}, b"")}
        with hops(routes) as (port, hosts):
            for path in ("/to-other-address", "/to-v6"):
                routes[path][1]["Location"] = routes[path][1]["Location"].format(port=port)
            fetcher = ServiceFetcher(UrlPolicy((f"http://127.0.0.1:{port}",)), FETCH)
            assert fetcher.read(f"http://127.0.0.1:{port}/one") == b"the image"
            for path in ("/to-other-port", "/to-other-address", "/to-v6", "/to-gs"):
                with pytest.raises(UrlRefused):
                    fetcher.read(f"http://127.0.0.1:{port}{path}")
            with pytest.raises(UrlRefused, match="redirects"):
                fetcher.read(f"http://127.0.0.1:{port}/loop")
        assert not connected()


def test_the_name_is_resolved_once_and_the_checked_address_is_the_one_connected_to():
    answers = iter(["127.0.0.1"] + ["10.0.0.1"] * 10)  # a rebinding DNS: the checked answer, then another
    calls = []

    def rebinding(host, port, type=None):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    with hops({"/image": (200, {}, b"pinned")}) as (port, hosts):
        fetcher = ServiceFetcher(UrlPolicy((f"http://127.0.0.1:{port}",)), FETCH, resolve=rebinding)
        assert fetcher.read(f"http://rebound.example:{port}/image") == b"pinned"
        assert calls == ["rebound.example"] and hosts == [f"rebound.example:{port}"]


def test_errors_never_repeat_the_remote_status_or_reason():
    with hops({"/forbidden": (403, {}, b"SECRET-REASON"), "/broken": (500, {}, b"SECRET-REASON"),
               "/big": (200, {}, b"x" * 5000)}) as (port, _), untouched_listener() as (closed, _):
        fetcher = ServiceFetcher(UrlPolicy(("http://127.0.0.1",)), FETCH)
        for url in (f"http://127.0.0.1:{port}/forbidden", f"http://127.0.0.1:{port}/broken",
                    f"http://127.0.0.1:{port}/absent"):
            with pytest.raises(inputs.FetchError) as caught:
                fetcher.read(url)
            # the URL alone: its port may hold "403" or "500" by chance, so the rest is compared whole
            assert str(caught.value) == f"could not fetch {url}"
        with pytest.raises(images.ImageTooLargeError):
            ServiceFetcher(UrlPolicy(("http://127.0.0.1",)), inputs.FetchConfig(max_bytes=1000, retries=0)).read(
                f"http://127.0.0.1:{port}/big")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        unused = s.getsockname()[1]
    with pytest.raises(inputs.FetchError) as caught:
        ServiceFetcher(UrlPolicy(("http://127.0.0.1",)), FETCH).read(f"http://127.0.0.1:{unused}/a.jpg")
    assert str(caught.value) == f"could not fetch http://127.0.0.1:{unused}/a.jpg"


def test_a_path_outside_ascii_is_sent_quoted():
    with hops({"/%C3%A9t%C3%A9.jpg?a=1": (200, {}, b"summer")}) as (port, _):
        assert ServiceFetcher(UrlPolicy(("http://127.0.0.1",)), FETCH).read(
            f"http://127.0.0.1:{port}/été.jpg?a=1") == b"summer"


def test_a_dripping_server_is_cut_off_at_the_callers_deadline():
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)

        def drip():
            connection, _ = listener.accept()
            with connection:
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000:
                    if stop.wait(0.05):
                        return
                    with contextlib.suppress(OSError):
                        connection.send(bytes([byte]))

        threading.Thread(target=drip, daemon=True).start()
        start = time.monotonic()
        try:
            with pytest.raises(inputs.FetchError, match="^could not fetch"):
                ServiceFetcher(UrlPolicy(("http://127.0.0.1",)), FETCH).read(
                    f"http://127.0.0.1:{listener.getsockname()[1]}/a.jpg", until=time.monotonic() + 1.5)
            assert time.monotonic() - start < 2.5
        finally:
            stop.set()
