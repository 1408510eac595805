"""The `reviews` app of the waypoint demo: an HTTP/1.1 server answering with its version.

GET any path -> 200 ``{"version": "v1", "pod": "reviews-v1", "path": "/..."}``, except (for the
resilience demo) ``/flaky...``: 503 from v1 (v2 answers 200), and ``/sleep/<seconds>...``: the
answer comes after that many seconds. Every request
is logged on stdout (``request <method> <path> from <ip> traceparent=<header or ->``), so tests
can tell that a request denied by the waypoint never reached the app, and which span called it.
Standard library only (runs with the system python3 in the pod's network namespace).
"""

from __future__ import annotations

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = sys.argv[2] if len(sys.argv) > 2 else "v1"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        trace = self.headers.get("traceparent", "-")
        print(
            f"request {self.command} {self.path} from {self.client_address[0]} traceparent={trace}",
            flush=True,
        )
        if self.path.startswith("/sleep/"):
            time.sleep(min(30.0, float(self.path.split("/")[2] or 0)))
        status = 503 if self.path.startswith("/flaky") and VERSION == "v1" else 200
        body = json.dumps(
            {"version": VERSION, "pod": os.environ.get("POD_NAME", "?"), "path": self.path}
        ).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9080
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    print(f"reviews {VERSION} listening on :{port}", flush=True)
    server.serve_forever()
