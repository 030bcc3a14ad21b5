"""A local HTTP server on 127.0.0.1 (port 0) that replays recorded responses, for offline tests.

Routes map a path to a list of replies served in order; the last reply repeats, so
`[Reply(503)]` means "503 forever". Every request is recorded (path and query) so tests can
check what a connector asked for. Use the `http_server` fixture: import `http_server_fixture` into a test module.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def chain_text(exc: BaseException | None) -> str:
    """Every message along an exception's cause/context chain (what a traceback could show)."""
    parts = []
    while exc is not None:
        parts.append(f"{exc!s} {exc.args!r} {getattr(exc, 'request', None)!r}")
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


@dataclass
class Reply:
    """One recorded response. `truncate_to` sends only that many body bytes, then closes,
    while Content-Length still announces the full body (a connection dropped mid-payload)."""

    status: int = 200
    body: bytes | str = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    truncate_to: int | None = None

    @classmethod
    def file(cls, relpath: str, content_type: str = "application/json", status: int = 200) -> Reply:
        """A reply whose body is tests/fixtures/<relpath>."""
        return cls(status, (FIXTURES / relpath).read_bytes(), content_type=content_type)


@dataclass
class Request:
    path: str
    query: dict[str, str]  # last value of each parameter
    raw: str  # the request target as received
    method: str = "GET"
    body: bytes = b""  # what a POST sent


class ReplayServer:
    def __init__(self) -> None:
        self.routes: dict[str, list[Reply]] = {}
        self.requests: list[Request] = []
        self._served: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = False  # server_close() then joins every handler thread
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def route(self, path: str, *replies: Reply) -> None:
        """Serve `replies` in order at `path`; the last one repeats."""
        self.routes[path] = list(replies)

    def count(self, path: str) -> int:
        return sum(1 for r in self.requests if r.path == path)

    def _next(self, path: str) -> Reply:
        with self._lock:
            replies = self.routes.get(path)
            if not replies:
                return Reply(404, b'{"error": {"type": "not_found", "message": "no route"}}')
            i = self._served.get(path, 0)
            self._served[path] = i + 1
            return replies[min(i, len(replies) - 1)]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: nothing left open

            def do_GET(self) -> None:
                self._serve(b"")

            def do_POST(self) -> None:
                self._serve(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def _serve(self, body_in: bytes) -> None:
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                with server._lock:
                    server.requests.append(
                        Request(parts.path, query, self.path, self.command, body_in)
                    )
                reply = server._next(parts.path)
                body = reply.body.encode() if isinstance(reply.body, str) else reply.body
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(body)))
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body if reply.truncate_to is None else body[: reply.truncate_to])

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> ReplayServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


@pytest.fixture(name="http_server")
def http_server_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[ReplayServer]:
    """A started ReplayServer; requests to it bypass any proxy configured in the environment."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with ReplayServer() as server:
        yield server
