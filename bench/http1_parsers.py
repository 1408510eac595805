"""HTTP/1.1 parser microbenchmark (issue 14): the waypoint's own codec against llhttp (through
`httptools`) on the waypoint bench's messages: wrk's request head and nginx's 1 KiB response.

    .venv/bin/python bench/http1_parsers.py

Per message, best of 7 (timeit, on process CPU time): a new parser per message, and one parser
reused over 100 keep-alive messages (the waypoint keeps one per connection). Columns: our
checked parser alone (`Http1Parser(..., fast=False)`); `Http1Parser` as the waypoint runs it
(the fast head reader, the checked parser only for a head it does not match; until session 9
llhttp read the heads there); llhttp alone, for scale.
Our parser yields every event (head, body, end); the llhttp side collects the same
(method/status, URL, lower-cased header names, body) through httptools' callbacks. Which build
runs (mypyc or pure Python) is printed first.
"""

from __future__ import annotations

import importlib
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

from meshcore import native
from waypoint.protocol.http1 import EndOfMessage, Http1Parser, Role

REQUEST = (
    b"GET /1k HTTP/1.1\r\nHost: 127.0.93.10\r\nUser-Agent: wrk\r\nAccept: */*\r\n"
    b"x-request-id: 0b7c7ac4-7a3d-4b0e-9b36-1f3f2a8e1a11\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 07:40:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
    b"Last-Modified: Sun, 06 Dec 2026 07:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "674f2f00-400"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 1024
)


def ours(role: Role, data: bytes, messages: int, fast: bool = False) -> None:
    p = Http1Parser(role, fast=fast)
    for _ in range(messages):
        if role is Role.RESPONSE:
            p.expect_response_to("GET")
        p.feed(data)
        while (ev := p.next_event()) is not None:
            if isinstance(ev, EndOfMessage):
                break


class _Collect:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.done = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done += 1


def llhttp(cls: Any, data: bytes, messages: int) -> None:
    cb = _Collect()
    p = cls(cb)
    for _ in range(messages):
        p.feed_data(data)
        cb.headers.clear()
        cb.body.clear()
    assert cb.done == messages


def per_message(fn: Callable[[], None], messages: int) -> float:
    # CPU time of this process, not wall time: on the shared machine a wall clock counts the
    # time other processes ran.
    n = max(2000 // messages, 1)
    return min(timeit.repeat(fn, number=n, repeat=7, timer=time.process_time)) / n / messages


def main() -> int:
    print(f"build: {native.select()}")
    httptools: Any = None
    with contextlib.suppress(ImportError):
        httptools = importlib.import_module("httptools")
    rows: list[tuple[str, float, float, float | None]] = []
    for label, role, data in (
        ("request head", Role.REQUEST, REQUEST),
        ("response head + 1 KiB", Role.RESPONSE, RESPONSE),
    ):
        for reuse in (1, 100):
            a = per_message(lambda r=role, d=data, n=reuse: ours(r, d, n), reuse)  # type: ignore[misc]
            w = per_message(lambda r=role, d=data, n=reuse: ours(r, d, n, True), reuse)  # type: ignore[misc]
            b = None
            if httptools is not None:
                cls = (
                    httptools.HttpRequestParser
                    if role is Role.REQUEST
                    else httptools.HttpResponseParser
                )
                b = per_message(lambda c=cls, d=data, n=reuse: llhttp(c, d, n), reuse)  # type: ignore[misc]
            rows.append((f"{label}, {'new parser' if reuse == 1 else 'reused x100'}", a, w, b))
    print("| message | ours, checked (us) | ours as run (us) | llhttp alone (us) |")
    print("|---|---:|---:|---:|")
    for label, a, w, b in rows:
        ll = f"{b * 1e6:.2f}" if b is not None else "not installed"
        print(f"| {label} | {a * 1e6:.2f} | {w * 1e6:.2f} | {ll} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
