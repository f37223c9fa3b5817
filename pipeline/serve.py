"""Serve queries over HTTP, with the index held hot and a web page:

    python -m pipeline.serve --index ROOT [--host 127.0.0.1] [--port 8080] [options]

Loads the network and the index's current version once (postings in memory when they fit in
``--max-memory``), then answers ``POST /v1/search`` (a multipart image upload, or JSON with an
http(s) URL; options as pipeline.search's, per request) with the records of results.json,
the seconds by stage and the version that answered. Also ``GET /v1/images/{id}``, the pictures of
recent queries, ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus) and the page at ``/``.

Every ``--reload-interval`` seconds it reads the root's pointer; a newly published version is
opened and checked beside the serving one, then served; queries in flight finish on their own
version; a version that fails to open is logged and not served. At most ``--workers`` queries run
and ``--max-queue`` wait (beyond: 503 with Retry-After); bodies are capped; each request has a
deadline (504); a connection that sends no complete request within ``--header-timeout`` is
closed. Query URLs reach public http(s) addresses only, unless ``--allow-url`` admits more.
SIGTERM drains: requests in flight finish, new ones get 503, then it exits 0. Details:
docs/serve.md.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading

from delf_retrieval.index import versions
from pipeline import cli
from pipeline.service import ServeConfig, Service
from pipeline.service.connections import listening_socket, protocol

log = logging.getLogger("pipeline.serve")
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def byte_size(text: str) -> int:
    """``4G``, ``512M``, ``20MB`` or a number of bytes (powers of 1024)."""
    match = SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4G, 512M, 1048576)")
    return int(float(match.group(1)) * 1024 ** "_kmgt".index((match.group(2) or "_").lower()))


def parse_args(argv=None):
    d = ServeConfig(index="")
    parser = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="index root: local folder or gs:// prefix (its current version)")
    parser.add_argument("--host", default=d.host, help="address to listen on (default %(default)s: this machine only)")
    parser.add_argument("--port", type=int, default=d.port, help="(default %(default)s; 0: any free port)")
    g = parser.add_argument_group("load and limits")
    g.add_argument("--workers", type=int, default=d.workers, help="queries answered at once (default %(default)s)")
    g.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="queries waiting for a worker; beyond, 503 with Retry-After (default %(default)s)")
    g.add_argument("--max-upload-bytes", type=byte_size, default=d.max_upload_bytes,
                   help="largest request body (default %(default)s)")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds a request may take in all, then 504 (default %(default)s)")
    g.add_argument("--max-requests", type=int, default=d.max_requests,
                   help="requests being answered at once; beyond, 503 (default %(default)s; idle connections "
                        "do not count)")
    g.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections; beyond, the one idle longest is closed (default %(default)s)")
    g.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help="seconds a connection may take to send a request's head; a connection answering "
                        "nothing is closed after it (default %(default)s)")
    g.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_timeout,
                   help="seconds an idle keep-alive connection is kept (default %(default)s)")
    g.add_argument("--max-memory", type=byte_size, default=d.engine.max_memory,
                   help="hold the postings in memory when they fit in this (default %(default)s bytes); else read "
                        "them per query through a cache of this size. A switch holds two versions for a while")
    g.add_argument("--recent-queries", type=int, default=d.recent_queries,
                   help="recent queries whose pictures can be drawn (default %(default)s)")
    g = parser.add_argument_group("versions and shutdown")
    g.add_argument("--reload-interval", type=float, default=d.reload_interval,
                   help="seconds between looks at the root's pointer for a new version (default %(default)s)")
    g.add_argument("--drain-timeout", type=float, default=d.drain_timeout,
                   help="on SIGTERM, the longest wait for requests in flight (default %(default)s)")
    g = parser.add_argument_group("access")
    g.add_argument("--allow-url", action="append", default=[], metavar="URL",
                   help="what query URLs may reach beyond public http(s) addresses (repeatable): gs://BUCKET/PREFIX "
                        "(read with this server's credentials), http(s)://HOST, http(s)://NETWORK/BITS")
    g.add_argument("--token-file", help="a file holding the bearer token the API requires (all but / and /healthz)")
    g.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log each request (default on)")
    cli.add_retrieval_arguments(parser)
    cli.add_fetch_arguments(parser)
    cli.add_debug_argument(parser)
    args = parser.parse_args(argv)
    cli.check_retrieval_arguments(parser, args)
    return args


def read_token(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token or any(c.isspace() for c in token):
        raise cli.UsageError(f"{path}: the token file must hold one token, without spaces")
    return token


def serve_config(args):
    return ServeConfig(index=args.index, host=args.host, port=args.port, workers=args.workers,
                       max_queue=args.max_queue, max_upload_bytes=args.max_upload_bytes,
                       request_timeout=args.request_timeout, reload_interval=args.reload_interval,
                       drain_timeout=args.drain_timeout, max_requests=args.max_requests,
                       max_connections=args.max_connections, header_timeout=args.header_timeout,
                       keep_alive_timeout=args.keep_alive_timeout,
                       token=read_token(args.token_file) if args.token_file else None,
                       recent_queries=args.recent_queries, allow_url=tuple(args.allow_url),
                       engine=cli.engine_config_from_args(args, resident=True, max_memory=args.max_memory),
                       fetch=cli.fetch_config_from_args(args))


def make_server(service, access_log: bool = True):
    """A uvicorn server whose first SIGTERM or SIGINT drains the service before it stops (a second
    one is uvicorn's own: stop now)."""
    import uvicorn  # heavy: imported on first use

    config = service.config

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if service.draining or sig not in (signal.SIGTERM, signal.SIGINT):
                return super().handle_exit(sig, frame)
            service.begin_drain()
            threading.Thread(target=self._drain, name="drain", daemon=True).start()

        def _drain(self):
            if not service.wait_idle(config.drain_timeout):
                log.warning("drain: %d requests still in flight after %g s; stopping", service.in_flight,
                            config.drain_timeout)
            self.should_exit = True

    # No limit_concurrency: uvicorn's counts idle connections; the protocol bounds those, Guard the requests.
    uv = uvicorn.Config(service.app, host=config.host, port=config.port, log_config=None, access_log=access_log,
                        http=protocol(config.header_timeout, config.max_connections),
                        timeout_keep_alive=config.keep_alive_timeout,
                        timeout_graceful_shutdown=max(config.drain_timeout, 1.0), lifespan="on")
    return DrainingServer(uv)


def run(argv=None) -> int:
    args = parse_args(argv)
    cli.quiet_tensorflow(args.debug)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        config = serve_config(args)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    check_index(config.index)
    sock = listen(config.host, config.port)  # both before the network and the index load: a wrong start fails now
    service = Service(config)
    port = sock.getsockname()[1]
    log.info("serving %s on http://%s:%d/ (%d workers, queue %d%s)", config.index, config.host, port,
             config.workers, config.max_queue, ", bearer token required" if config.token else "")
    with sock:
        make_server(service, access_log=args.access_log).run(sockets=[sock])
    log.info("stopped")
    return 0


def check_index(root: str) -> None:
    """A usage error unless an index is published at ``root``."""

    try:
        pointer, _ = versions.current(root)
    except (FileNotFoundError, NotADirectoryError):
        pointer = None
    if pointer is None:
        raise cli.UsageError(f"{root}: no index is published there (no manifest.json at its root)")


def listen(host: str, port: int):

    try:
        return listening_socket(host, port)
    except OSError as e:
        raise cli.UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


if __name__ == "__main__":
    sys.exit(cli.main(run))
