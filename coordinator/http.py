"""The coordinator's HTTP server: the status page (/), its JSON (/api/v1/status, with pages of
/api/v1/workers and /api/v1/rounds) and Prometheus metrics (/metrics). Read-only, and cheap to
poll by any number of viewers: the status and the metrics are computed at most once a second
and shared; at most `http_connections` connections are served at once, each for at most
TIMEOUT seconds of silence. Nothing here dials anywhere."""

import json
import logging
import threading
import time
from urllib.parse import parse_qs
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST

from gptswarm.coordinator import metrics
from gptswarm.coordinator.status import WORKERS_SHOWN, snapshot, worker_rows
from gptswarm.errors import UserError

log = logging.getLogger("gptswarm.http")
STATIC = Path(__file__).resolve().parent / "static"
FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/static/style.css": ("style.css", "text/css; charset=utf-8")}
# no inline script, no event-handler attributes, nothing from other origins
TIMEOUT = 10  # seconds a connection may stay silent
MAX_ROUNDS_PAGE = 1000
CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'"


class Cached:
    """A value computed at most once per `seconds`, shared by every thread that asks (value and at
    under self.lock; the value itself is an immutable bytes)."""

    def __init__(self, compute, seconds):
        self.compute, self.seconds = compute, seconds
        self.lock = threading.Lock()
        self.value, self.at = None, float("-inf")

    def get(self):
        with self.lock:
            if time.monotonic() - self.at >= self.seconds:
                self.value, self.at = self.compute(), time.monotonic()
            return self.value


class BoundedServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that serves at most `slots` connections at once and closes the rest."""

    daemon_threads = True
    slots = None  # threading.BoundedSemaphore

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class StatusServer:
    """The HTTP server on its own thread, a thread per connection; handlers read the coordinator's
    snapshots (RoundView, the ledger's views) through Cached, and nothing here changes after start."""

    def __init__(self, coord, listen):
        self.coord = coord
        self.registry = metrics.registry(coord)
        seconds = coord.config.status_cache_seconds
        self.status = Cached(lambda: json.dumps(snapshot(coord)).encode(), seconds)
        self.metrics = Cached(lambda: metrics.exposition(self.registry), seconds)
        host, _, port = listen.rpartition(":")
        handler = type("Handler", (Handler,), {"server_ref": self})
        try:
            self.httpd = BoundedServer((host or "0.0.0.0", int(port)), handler)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot serve the status page on {listen}: {e}") from None
        self.httpd.slots = threading.BoundedSemaphore(coord.config.http_connections)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def shutdown(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class BadQuery(ValueError):
    pass


def int_arg(query, name, default, low, high):
    values = query.get(name)
    if not values:
        return default
    try:
        v = int(values[0])
    except ValueError:
        raise BadQuery(f"{name} must be an integer") from None
    if not low <= v <= high:
        raise BadQuery(f"{name} must be between {low} and {high}")
    return v


class Handler(BaseHTTPRequestHandler):
    server_ref = None
    timeout = TIMEOUT

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)

    def send(self, code, body, ctype):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, code, obj):
        self.send(code, json.dumps(obj).encode(), "application/json")

    def do_GET(self):
        srv = self.server_ref
        path, _, qs = self.path.partition("?")
        try:
            query = parse_qs(qs[:1000])
            if path in FILES:
                name, ctype = FILES[path]
                return self.send(200, (STATIC / name).read_bytes(), ctype)
            if path == "/api/v1/status":
                return self.send(200, srv.status.get(), "application/json")
            if path == "/api/v1/workers":
                limit = int_arg(query, "limit", 100, 1, WORKERS_SHOWN)
                offset = int_arg(query, "offset", 0, 0, 1 << 40)
                return self.send_json(200, {"total": srv.coord.ledger.worker_counts()["total"], "offset": offset,
                                            "workers": worker_rows(srv.coord, time.time(), limit, offset)})
            if path == "/api/v1/rounds":
                limit = int_arg(query, "limit", 100, 1, MAX_ROUNDS_PAGE)
                before = int_arg(query, "before", None, 0, 1 << 62)
                return self.send_json(200, {"rounds": srv.coord.ledger.finished_rounds(limit, before)})
            if path == "/metrics":
                return self.send(200, srv.metrics.get(), CONTENT_TYPE_LATEST)
            return self.send_json(404, {"error": f"no such page: {path[:100]}"})
        except BadQuery as e:
            return self.send_json(400, {"error": str(e)})
        except Exception:  # a bad request must never take the coordinator down
            log.exception("error serving %s", path[:100])
            return self.send_json(500, {"error": "internal error"})
