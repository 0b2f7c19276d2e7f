"""The coordinator's HTTP server: the status page (/), its JSON (/api/v1/status) and Prometheus
metrics (/metrics). Read-only."""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST

from gptswarm.coordinator import metrics
from gptswarm.coordinator.status import snapshot
from gptswarm.errors import UserError

log = logging.getLogger("gptswarm.http")
STATIC = Path(__file__).resolve().parent / "static"
FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
         "/static/style.css": ("style.css", "text/css; charset=utf-8")}
# no inline script, no event-handler attributes, nothing from other origins
CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'"


class StatusServer:
    def __init__(self, coord, listen):
        self.coord = coord
        self.registry = metrics.registry(coord)
        host, _, port = listen.rpartition(":")
        handler = type("Handler", (Handler,), {"server_ref": self})
        try:
            self.httpd = ThreadingHTTPServer((host or "0.0.0.0", int(port)), handler)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot serve the status page on {listen}: {e}") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    def start(self):
        self.thread.start()
        return self

    def shutdown(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class Handler(BaseHTTPRequestHandler):
    server_ref = None

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
        path = self.path.partition("?")[0]
        try:
            if path in FILES:
                name, ctype = FILES[path]
                return self.send(200, (STATIC / name).read_bytes(), ctype)
            if path == "/api/v1/status":
                return self.send_json(200, snapshot(srv.coord))
            if path == "/metrics":
                return self.send(200, metrics.exposition(srv.registry), CONTENT_TYPE_LATEST)
            return self.send_json(404, {"error": f"no such page: {path[:100]}"})
        except Exception:  # a bad request must never take the coordinator down
            log.exception("error serving %s", path[:100])
            return self.send_json(500, {"error": "internal error"})
