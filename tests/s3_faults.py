"""A faulty S3 endpoint for tests: an HTTP reverse proxy on a loopback port in front of moto.

It forwards every request to the upstream S3 server, except that it can

* fail a fraction of requests, chosen by a seeded RNG, in one of three ways: answer
  ``503 SlowDown`` without forwarding, forward and then answer ``500 InternalError`` (the
  write did happen: retrying it must be harmless), or close the connection without answering;
* stop (close its port: connections are refused) and start again on the same port;
* hang: accept requests and never answer them, until resumed (then it drops them unanswered,
  so a request the client gave up on never reaches the store late).

Loopback only; handler threads are daemons and ``close`` stops everything.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {
    "server",  # the proxy sends its own Server and Date
    "date",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "proxy-authorization",
    "proxy-connection",
}

ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>{message}</Message><RequestId>fault-injection</RequestId></Error>"
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real endpoint

    def setup(self):
        super().setup()
        self.server.proxy._track(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.connection, False)

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self):
        self.server.proxy._serve(self, self._body())

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class FaultyS3Proxy:
    """See the module docstring. ``fail_fraction`` of requests fail, each in one of
    ``kinds`` ("slowdown", "internal", "drop"), drawn from ``random.Random(seed)``."""

    def __init__(self, upstream: str, fail_fraction: float = 0.0, seed: int = 0, kinds=None):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.fail_fraction = fail_fraction
        self.kinds = tuple(kinds or ("slowdown", "internal", "drop"))
        self.counts: Counter = Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._resume = threading.Event()
        self._resume.set()
        self._server: _Server | None = None
        self.port = 0
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # Controls.

    def start(self) -> None:
        """Listen (again, on the same port once it has one)."""
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.proxy = self
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        """Close the port and every open connection: new connections are refused."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        self._drop_all()

    def hang(self) -> None:
        """From now on accept requests but answer none of them."""
        self._resume.clear()

    def resume(self) -> None:
        """Answer requests again (the ones held while hanging are dropped unanswered)."""
        self._resume.set()

    def close(self) -> None:
        self._resume.set()
        self.stop()

    # Internals.

    def _track(self, conn: socket.socket, open_: bool) -> None:
        with self._lock:
            (self._connections.add if open_ else self._connections.discard)(conn)

    def _drop_all(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _drop(self, handler: _Handler) -> None:
        handler.close_connection = True
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _serve(self, handler: _Handler, body: bytes) -> None:
        with self._lock:
            self.counts["requests"] += 1
            fault, u = None, self._rng.random()
            if u < self.fail_fraction:  # u / fail_fraction is uniform in [0, 1): pick the kind
                fault = self.kinds[int(u / self.fail_fraction * len(self.kinds))]
                self.counts[fault] += 1
        if not self._resume.is_set():
            self.counts["hung"] += 1
            while not self._resume.wait(0.1):
                pass
            self._drop(handler)
            return
        if fault == "drop":
            self._drop(handler)
            return
        if fault == "slowdown":
            self._reply(handler, 503, {}, self._error("SlowDown", "Please slow down."))
            return
        status, headers, data = self._forward(handler, body)
        if fault == "internal":
            status, headers, data = 500, {}, self._error("InternalError", "Injected fault.")
        self._reply(handler, status, headers, data)

    def _error(self, code: str, message: str) -> bytes:
        return ERROR_BODY.format(code=code, message=message).encode()

    def _forward(self, handler: _Handler, body: bytes):
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.putrequest(
                handler.command, handler.path, skip_host=True, skip_accept_encoding=True
            )
            for name, value in handler.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                    conn.putheader(name, value)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            data = resp.read()
            headers = {k: v for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP}
            return resp.status, headers, data
        finally:
            conn.close()

    def _reply(self, handler: _Handler, status: int, headers: dict, data: bytes) -> None:
        try:
            handler.send_response(status)
            for name, value in headers.items():
                if name.lower() != "content-length" or handler.command == "HEAD":
                    handler.send_header(name, value)
            if handler.command != "HEAD":
                handler.send_header("Content-Length", str(len(data)))
            elif "content-length" not in {k.lower() for k in headers}:
                handler.send_header("Content-Length", "0")
            if status >= 500:
                handler.send_header("Content-Type", "application/xml")
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(data)
            handler.wfile.flush()
        except OSError:  # the client gave up on this request
            handler.close_connection = True
