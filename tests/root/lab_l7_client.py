"""A client for the lab's issue-17 test, run with the venv's python in the lab's client pod
(``ip netns exec``): ``MODE ARGS...``, prints one JSON line.

- ``ws-h2 PATH``: WebSocket over HTTP/2 (RFC 8441 extended CONNECT) to reviews:9080, three
  text frames; {"settings": ENABLE_CONNECT_PROTOCOL, "status": ..., "echo": [...]}
- ``expect PATH``: HTTP/1.1 POST with ``Expect: 100-continue``; {"interim": first status line,
  "final": final status line}
- ``cookie N``: N sessions: a GET without the cookie, then 5 with the cookie it set;
  {"sessions": [{"set_cookie": ..., "versions": [...]}]}
- ``post PATH SIZE``: POST SIZE bytes (streamed); {"status": ..., "body": ..., "seconds": ...}
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator

import h2.config
import h2.connection
import h2.events

HOST, PORT = "reviews", 9080


def ws_frame(text: str) -> bytes:
    data = text.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return bytes([0x81, 0x80 | len(data)]) + mask + masked


def ws_h2(path: str) -> dict[str, object]:
    sock = socket.create_connection((HOST, PORT), timeout=10)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    out: dict[str, object] = {"status": None, "echo": []}
    data = b""

    def pump() -> list[h2.events.Event]:
        events = conn.receive_data(sock.recv(65536))
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        sock.sendall(conn.data_to_send())
        return events

    while conn.remote_settings.enable_connect_protocol != 1:
        if not pump():
            break
    out["settings"] = conn.remote_settings.enable_connect_protocol
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [
            (":method", "CONNECT"),
            (":protocol", "websocket"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"{HOST}:{PORT}"),
            ("sec-websocket-version", "13"),
        ],
    )
    sock.sendall(conn.data_to_send())
    deadline = time.monotonic() + 10
    sent = False
    while time.monotonic() < deadline:
        for ev in pump():
            if isinstance(ev, h2.events.ResponseReceived):
                fields = {
                    str(k, "ascii") if isinstance(k, bytes) else str(k): v
                    for k, v in ev.headers or []
                }
                status = fields[":status"]
                out["status"] = status.decode() if isinstance(status, bytes) else str(status)
            elif isinstance(ev, h2.events.DataReceived):
                data += ev.data or b""
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                deadline = 0
        if out["status"] == "200" and not sent:
            for i in range(3):
                conn.send_data(sid, ws_frame(f"m{i}"))
            sock.sendall(conn.data_to_send())
            sent = True
        frames = []
        rest = data
        while len(rest) >= 2 and len(rest) >= 2 + rest[1]:
            frames.append(rest[2 : 2 + rest[1]].decode())
            rest = rest[2 + rest[1] :]
        out["echo"] = frames
        if len(frames) == 3 or out["status"] not in (None, "200"):
            break
    sock.close()
    return out


def expect(path: str) -> dict[str, object]:
    sock = socket.create_connection((HOST, PORT), timeout=10)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{PORT}\r\nContent-Length: 5\r\n"
        "Expect: 100-continue\r\nConnection: close\r\n\r\n".encode()
    )
    first = sock.recv(4096).decode(errors="replace")
    out: dict[str, object] = {"interim": first.split("\r\n")[0], "final": ""}
    if first.startswith("HTTP/1.1 100"):
        sock.sendall(b"hello")
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        out["final"] = rest.decode(errors="replace").split("\r\n")[0]
    sock.close()
    return out


def cookie(n: int) -> dict[str, object]:
    sessions = []
    for _ in range(n):
        c = http.client.HTTPConnection(HOST, PORT, timeout=10)
        c.request("GET", "/")
        r = c.getresponse()
        first = json.loads(r.read())["version"]
        set_cookie = r.getheader("set-cookie") or ""
        c.close()
        versions = [first]
        value = set_cookie.split(";")[0]
        for _ in range(5):
            c = http.client.HTTPConnection(HOST, PORT, timeout=10)
            c.request("GET", "/", headers={"cookie": value} if value else {})
            r = c.getresponse()
            versions.append(json.loads(r.read())["version"])
            c.close()
        sessions.append({"set_cookie": set_cookie, "versions": versions})
    return {"sessions": sessions}


def post(path: str, size: int) -> dict[str, object]:
    block = b"b" * 65536

    def body() -> Iterator[bytes]:
        left = size
        while left > 0:
            yield block[: min(left, len(block))]
            left -= len(block)

    t0 = time.monotonic()
    c = http.client.HTTPConnection(HOST, PORT, timeout=60)
    c.request("POST", path, body=body(), headers={"content-length": str(size)})
    r = c.getresponse()
    text = r.read().decode()
    return {"status": r.status, "body": text, "seconds": round(time.monotonic() - t0, 2)}


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    modes: dict[str, Callable[[], dict[str, object]]] = {
        "ws-h2": lambda: ws_h2(args[0]),
        "expect": lambda: expect(args[0]),
        "cookie": lambda: cookie(int(args[0])),
        "post": lambda: post(args[0], int(args[1])),
    }
    result = modes[mode]()
    print(json.dumps(result))
