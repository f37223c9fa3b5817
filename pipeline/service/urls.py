"""What a service query may fetch by URL (UrlPolicy, --allow-url) and the fetcher that holds to it."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

from delf_retrieval.corpus import images, inputs

MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
RETRIED = (429, 500, 502, 503, 504)
SCHEMES = ("http", "https", "gs")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlRefused(inputs.FetchError):
    """A URL the service does not fetch (its address, scheme or bucket is not admitted)."""

    reason = "url_refused"


class AllowUrlError(ValueError):
    """An --allow-url entry that cannot be understood."""


def public(address: IPAddress) -> bool:
    """Whether an address is on the public internet: not loopback, private, link-local, unique-local,
    shared (CGNAT), multicast, reserved, documentation or unspecified, nor an IPv6 form that
    carries such an IPv4 address (mapped, 6to4, Teredo, NAT64)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is None and address in ipaddress.IPv6Network("64:ff9b::/96"):
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not public(embedded):
            return False
    return address.is_global and not address.is_multicast and not address.is_reserved


@dataclass(frozen=True)
class Target:
    """A URL checked against the policy: where to connect (``addresses``, already resolved and
    checked) and what to ask for there."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]


def _entry(text: str):
    """One --allow-url entry as ("gs", prefix) | ("net", scheme, network, port) | ("host", scheme, name, port, path)."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in SCHEMES or not parts.netloc:
        raise AllowUrlError(f"--allow-url {text}: give gs://BUCKET/PREFIX, http(s)://HOST or http(s)://NETWORK/BITS")
    if parts.scheme == "gs":
        return ("gs", f"gs://{parts.netloc}/{parts.path.lstrip('/')}")
    if parts.username is not None or parts.query or parts.fragment:
        raise AllowUrlError(f"--allow-url {text}: no credentials, query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise AllowUrlError(f"--allow-url {text}: a bad port") from None
    host = parts.hostname or ""
    bits = parts.path.lstrip("/")
    try:
        return ("net", parts.scheme, ipaddress.ip_network(f"{host}/{bits}" if bits.isdigit() else host, strict=False),
                port)
    except ValueError:
        pass
    if bits.isdigit():
        raise AllowUrlError(f"--allow-url {text}: /{bits} after a name, not an address")
    return ("host", parts.scheme, host.rstrip("."), port, parts.path if parts.path not in ("", "/") else "")


class UrlPolicy:
    """What a service query may fetch: http(s) URLs whose host resolves to public addresses only,
    unless an ``allow`` entry (``--allow-url``) admits more: ``http(s)://NAME`` a host by name (any
    address it resolves to), ``http(s)://ADDRESS[/BITS]`` an address or network, ``gs://BUCKET/PREFIX``
    objects under a prefix (read with the server's credentials); an entry may name a port. Every
    other scheme, and gs:// by default, is refused."""

    def __init__(self, allow: tuple[str, ...] = ()):
        self.allow = tuple(allow)
        self._entries = [_entry(text) for text in self.allow]

    def check_gs(self, url: str) -> None:
        path = url[len("gs://"):]
        if any(segment in (".", "..") for segment in path.split("/")[1:]) or "//" in path:
            raise UrlRefused(f"refused: {url} (a path with empty, . or .. segments)")
        if not any(kind == "gs" and url.startswith(prefix) for kind, prefix, *_ in self._entries):
            raise UrlRefused(f"refused: {url} (gs:// is read only under the prefixes --allow-url names)")

    def _named(self, scheme: str, host: str, port: int, path: str) -> bool:
        return any(e[0] == "host" and e[1] == scheme and e[2].lower() == host.lower() and e[3] in (None, port)
                   and path.startswith(e[4]) for e in self._entries)

    def _admitted(self, scheme: str, address: IPAddress, port: int) -> bool:
        return public(address) or any(
            e[0] == "net" and e[1] == scheme and e[3] in (None, port) and e[2].version == address.version
            and address in e[2] for e in self._entries)

    def check(self, url: str, resolve=socket.getaddrinfo) -> Target:
        """The target of an http(s) URL, its host resolved once and every address checked: refused
        (UrlRefused) before any connection when it is not admitted."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise UrlRefused(f"refused: {url[:200]} (only http(s) is fetched)")
        if parts.username is not None or parts.password is not None:
            raise UrlRefused("refused: a URL carrying credentials")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            host = parts.hostname or ""
            path = urllib.parse.quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                                      safe="/?&=%:@!$'()*+,;~-._[]")
        except ValueError:
            raise UrlRefused(f"refused: {url[:200]} (a bad port)") from None
        if not host or any(ord(c) <= 32 or ord(c) == 127 for c in url):
            raise UrlRefused(f"refused: {url[:200]} (no host, or control characters)")
        named = self._named(parts.scheme, host, port, parts.path or "/")
        try:
            found = resolve(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise inputs.FetchError(f"could not fetch {url[:200]}: its host does not resolve") from None
        addresses = []
        for *_, sockaddr in found:
            address = ipaddress.ip_address(sockaddr[0].split("%")[0])
            if not (named or self._admitted(parts.scheme, address, port)):
                raise UrlRefused(f"refused: {url[:200]} (its host is not a public address; --allow-url admits "
                                 "more)")
            if str(address) not in addresses:
                addresses.append(str(address))
        if not addresses:
            raise inputs.FetchError(f"could not fetch {url[:200]}: its host does not resolve")
        return Target(url, parts.scheme, host, port, path, tuple(addresses))


class _Cutoff:
    """The end of one GET: when it passes, its socket is shut down, so a read blocked on a server
    that drips returns at once (closing from another thread would pull the file from under it)."""

    def __init__(self, seconds: float):
        self.expired = False
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sock = sock
            if self.expired:
                inputs.shut(sock)
        return sock

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                inputs.shut(self._sock)

    def cancel(self) -> None:
        self._timer.cancel()


class _Pinned:
    """http.client connections to the address the policy checked, with the URL's host in the Host
    header and in TLS (SNI and the certificate's name): DNS is asked once, never again."""

    class HTTP(http.client.HTTPConnection):
        def __init__(self, target: Target, address: str, timeout: float, cutoff: _Cutoff):
            super().__init__(target.host, target.port, timeout=timeout)
            self.address, self.cutoff = address, cutoff

        def connect(self):
            self.sock = self.cutoff.watch(socket.create_connection((self.address, self.port), self.timeout))

    class HTTPS(http.client.HTTPSConnection):
        def __init__(self, target: Target, address: str, timeout: float, cutoff: _Cutoff):
            super().__init__(target.host, target.port, timeout=timeout, context=ssl.create_default_context())
            self.address, self.cutoff = address, cutoff

        def connect(self):
            sock = self.cutoff.watch(socket.create_connection((self.address, self.port), self.timeout))
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _Status(Exception):
    def __init__(self, status: int):
        self.status = status


class ServiceFetcher:
    """The service's reader of query URLs: http(s) under a :class:`UrlPolicy` (each hop of a redirect
    checked as the first, at most MAX_REDIRECTS), gs:// only under admitted prefixes, all within the
    :class:`inputs.FetchConfig`'s size cap and timeout and the request's deadline. Its errors say
    "refused" or "could not fetch", never the remote's status or reason."""

    def __init__(self, policy: UrlPolicy, config: inputs.FetchConfig = inputs.FetchConfig(),
                 resolve=socket.getaddrinfo):
        self.policy, self.config, self.resolve = policy, config, resolve
        self._storage = inputs.Fetcher(config)

    def read(self, url: str, until: float | None = None) -> bytes:
        """The bytes at ``url``; ``until`` is the caller's deadline (time.monotonic())."""
        if url.startswith("gs://"):
            self.policy.check_gs(url)
            try:
                return inputs.read_image_bytes(url, self._storage, until=until)
            except images.ImageTooLargeError:
                raise
            except (images.ImageError, OSError):
                raise inputs.FetchError(f"could not fetch {url[:200]}") from None
        end = time.monotonic() + self.config.timeout * (self.config.retries + 1)
        end = min(end, until) if until is not None else end
        for attempt in range(self.config.retries + 1):
            if attempt:
                pause = self.config.backoff * 2 ** (attempt - 1)
                if time.monotonic() + pause >= end:
                    break
                time.sleep(pause)
            try:
                return self._follow(url, min(end, time.monotonic() + self.config.timeout))
            except _Status as e:
                if e.status not in RETRIED:
                    break
            except (images.ImageTooLargeError, inputs.FetchError):
                raise  # our own size cap, a refusal: said as they are
            except (OSError, http.client.HTTPException, ValueError):
                pass  # whatever the remote did (ssl errors are OSErrors; a bad header a ValueError)
        raise inputs.FetchError(f"could not fetch {url[:200]}")

    def _follow(self, url: str, end: float) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            target = self.policy.check(url, self.resolve)
            status, location, body = self._get(target, end)
            if status not in REDIRECTS:
                if status != 200:
                    raise _Status(status)
                return body
            if not location:
                raise _Status(status)
            url = urllib.parse.urljoin(url, location)
        raise UrlRefused(f"refused: more than {MAX_REDIRECTS} redirects")

    def _get(self, target: Target, end: float) -> tuple[int, str | None, bytes]:
        """(status, Location, body) of one GET, ended at ``end`` whatever the server does."""
        last: Exception = TimeoutError()
        for address in target.addresses:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise TimeoutError()
            kind = _Pinned.HTTPS if target.scheme == "https" else _Pinned.HTTP
            cutoff = _Cutoff(remaining)  # a dripping server is cut off at the end
            connection = kind(target, address, remaining, cutoff)
            try:
                connection.request("GET", target.path, headers={"User-Agent": self.config.user_agent,
                                                                "Accept": "image/*"})
                response = connection.getresponse()
                if response.status != 200:
                    return response.status, response.getheader("Location"), b""
                length = response.getheader("Content-Length")
                if length and length.isdigit() and int(length) > self.config.max_bytes:
                    raise images.ImageTooLargeError(f"{target.url[:200]}: larger than {self.config.max_bytes} bytes")
                body = response.read(self.config.max_bytes + 1)
                if len(body) > self.config.max_bytes:
                    raise images.ImageTooLargeError(f"{target.url[:200]}: larger than {self.config.max_bytes} bytes")
                if cutoff.expired:  # the body may end early without an error once its socket is shut
                    raise TimeoutError()
                return 200, None, body
            except (ConnectionError, socket.timeout) as e:
                last = e
            finally:
                cutoff.cancel()
                connection.close()
        raise last
