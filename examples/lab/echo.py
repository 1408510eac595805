"""A tiny TCP echo server for the lab demo: tells each client who it is and who it sees.

For each connection it writes one line, ``hello from <pod> (<namespace>): you are <ip>:<port>``,
then echoes every line it receives prefixed with ``echo: ``. Only the standard library: it runs
with the system python3 inside a pod's network namespace.
"""

from __future__ import annotations

import os
import socketserver
import sys


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        ip, port = self.client_address[:2]
        me = os.environ.get("POD_NAME", "?"), os.environ.get("POD_NAMESPACE", "?")
        self.wfile.write(f"hello from {me[0]} ({me[1]}): you are {ip}:{port}\n".encode())
        print(f"connection from {ip}:{port}", flush=True)
        for line in self.rfile:
            self.wfile.write(b"echo: " + line)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024  # socketserver's default backlog is 5: a client burst overflows it


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    with Server(("0.0.0.0", port), Handler) as server:
        print(f"echo listening on :{port}", flush=True)
        server.serve_forever()
