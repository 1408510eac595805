"""The `reviews` app of the waypoint demo: an HTTP/1.1 server answering with its version.

GET any path -> 200 ``{"version": "v1", "pod": "reviews-v1", "path": "/..."}``, except:
- (the resilience demo) ``/flaky...``: 503 from v1 (v2 answers 200); ``/fail-<version>...``:
  503 from that version; ``/sleep/<seconds>...``: the answer comes after that many seconds;
- a WebSocket handshake (``Upgrade: websocket``, RFC 6455 §4.2): 101, then each text frame
  comes back as ``<version>:<text>``;
- ``/oidc/.well-known/openid-configuration`` and ``/oidc/keys``: a tiny OpenID provider
  (issuer ``http://<Host>/oidc``) whose key set is the file ``oidc-keys.txt`` next to this
  script (written by a test).
POST reads the body (any size, never kept) and answers with its length. Every request is
logged on stdout (``request <method> <path> from <ip> traceparent=<header or -> len=<body>``),
so tests can tell that a request denied by the waypoint never reached the app, which span
called it, and what a mirror carried. Standard library only (runs with the system python3 in
the pod's network namespace).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

VERSION = sys.argv[2] if len(sys.argv) > 2 else "v1"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _log(self, length: int = 0) -> None:
        trace = self.headers.get("traceparent", "-")
        print(
            f"request {self.command} {self.path} from {self.client_address[0]} "
            f"traceparent={trace} len={length}",
            flush=True,
        )

    def _json(self, status: int, payload: dict[str, object]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._log()
        if self.headers.get("upgrade", "").lower() == "websocket":
            self._websocket()
            return
        if self.path.startswith("/oidc/"):
            self._oidc()
            return
        if self.path.startswith("/sleep/"):
            time.sleep(min(30.0, float(self.path.split("/")[2] or 0)))
        failing = self.path.startswith(f"/fail-{VERSION}") or (
            self.path.startswith("/flaky") and VERSION == "v1"
        )
        status = 503 if failing else 200
        pod = os.environ.get("POD_NAME", "?")
        self._json(status, {"version": VERSION, "pod": pod, "path": self.path})

    def do_POST(self) -> None:
        left = int(self.headers.get("content-length") or 0)
        total = 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            total += len(chunk)
            left -= len(chunk)
        self._log(total)
        self._json(200, {"version": VERSION, "path": self.path, "body_len": total})

    def _oidc(self) -> None:
        issuer = f"http://{self.headers.get('host', '')}/oidc"
        if self.path == "/oidc/.well-known/openid-configuration":
            self._json(200, {"issuer": issuer, "jwks_uri": f"{issuer}/keys"})
            return
        keys = Path(__file__).with_name("oidc-keys.txt")
        if self.path == "/oidc/keys" and keys.exists():
            self._json(200, json.loads(keys.read_text()))
            return
        self._json(404, {"error": "not found"})

    def _websocket(self) -> None:
        key = self.headers.get("sec-websocket-key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("upgrade", "websocket")
        self.send_header("connection", "Upgrade")
        self.send_header("sec-websocket-accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:  # RFC 6455 §5.2: small masked client frames; echo text, stop on close
            head = self.rfile.read(2)
            if len(head) < 2 or head[0] & 0x0F == 0x8:
                return
            length = head[1] & 0x7F
            if length == 126:
                length = int.from_bytes(self.rfile.read(2), "big")
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            out = f"{VERSION}:".encode() + data
            self.wfile.write(bytes([0x81, len(out)]) + out if len(out) < 126 else b"")
            self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9080
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    print(f"reviews {VERSION} listening on :{port}", flush=True)
    server.serve_forever()
