"""Lab client: connect to HOST PORT, print the server's greeting and the echo of one line.

Usage (inside a pod): python3 call.py echo.demo 80 [message]. Exit 1 on any failure, with the
reason, so tests and the demo can tell "refused/reset/timeout" apart.
"""

from __future__ import annotations

import socket
import sys

host, port = sys.argv[1], int(sys.argv[2])
message = sys.argv[3] if len(sys.argv) > 3 else "ping"
try:
    with socket.create_connection((host, port), timeout=5) as sock:
        f = sock.makefile("rwb")
        greeting = f.readline().decode().rstrip()
        f.write(message.encode() + b"\n")
        f.flush()
        reply = f.readline().decode().rstrip()
        if not greeting or not reply:
            raise ConnectionError("connection closed before the reply")
        print(greeting)
        print(reply)
except (OSError, ValueError) as err:
    print(f"call failed: {type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(1)
