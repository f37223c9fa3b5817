"""The connections the service keeps: a header timeout and a cap on open connections (uvicorn's h11)."""

from __future__ import annotations

import socket
import time

from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with two bounds it lacks. A connection that is not answering a
    request (new, between keep-alive requests, or after its answer while its client is still
    sending) is closed ``header_timeout`` seconds after it became so, unless a complete request
    head arrives: a client dripping its headers, or sending nothing, holds a socket for that
    long at most. And past ``max_open`` connections, each new one closes the connection that has
    waited longest without a request, so idle sockets never keep a real client out.

    uvicorn's own ``limit_concurrency`` counts open connections, idle ones too; the service
    leaves it off and limits the requests being answered instead (``limits.Guard``)."""

    header_timeout = 10.0
    max_open = 1024

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timer = None
        self.idle_since: float | None = None

    def answering(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watch()
        if len(self.connections) > self.max_open:
            idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol)
                    and c.idle_since is not None]
            if idle:
                min(idle, key=lambda c: c.idle_since).close_idle()

    def _watch(self) -> None:
        """The timer runs while no request is being answered, from the moment that became so."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.answering():
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            self.idle_since = None
        elif self._header_timer is None:
            self.idle_since = time.monotonic()
            self._header_timer = self.loop.call_later(self.header_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._header_timer = None
        if not self.answering():
            self.close_idle()

    def close_idle(self) -> None:
        """Close this connection, which is answering no request."""
        self.idle_since = None
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self.idle_since = None
        super().connection_lost(exc)


def protocol(header_timeout: float, max_open: int) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn.Config(http=...), with these bounds."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout,
                                                              "max_open": max_open})


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound now (so a port in use is a one-line error before anything loads),
    as uvicorn binds its own: SO_REUSEADDR, IPv6 for an address with a colon."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
