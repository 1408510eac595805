"""Load generator of the waypoint demo: N HTTP requests to a URL, counted by app version.

Usage (inside a pod): python3 load.py URL N [--pace=SECONDS] [Header:value ...] (--pace: the
time between request starts, default 0: back to back). Each request uses a NEW
connection (so L4 balancing is visible too, which is per connection). Prints one JSON line:
``{"n": N, "versions": {"v1": ..}, "status": {"200": ..}, "errors": .., "ratelimit": {..},
"seconds": ..}`` (``ratelimit``: the ``x-ratelimit-limit`` values seen, by status; ``seconds``:
the slowest request).
"""

from __future__ import annotations

import http.client
import json
import sys
import time
import urllib.parse
from collections import Counter

url = urllib.parse.urlsplit(sys.argv[1])
n = int(sys.argv[2])
pace = 0.0
for arg in sys.argv[3:]:
    if arg.startswith("--pace="):
        pace = float(arg.removeprefix("--pace="))
headers = dict(h.split(":", 1) for h in sys.argv[3:] if not h.startswith("--pace="))
versions: Counter[str] = Counter()
status: Counter[str] = Counter()
ratelimit: Counter[str] = Counter()
errors = 0
slowest = 0.0
for i in range(n):
    start = time.monotonic()
    try:
        conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=10)
        conn.request("GET", url.path or "/", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        status[str(resp.status)] += 1
        limit = resp.getheader("x-ratelimit-limit")
        if limit is not None:
            ratelimit[f"{resp.status}:{limit}"] += 1
        if resp.status == 200:
            versions[json.loads(body).get("version", "?")] += 1
    except (OSError, ValueError, http.client.HTTPException):
        errors += 1
    slowest = max(slowest, time.monotonic() - start)
    if pace and i + 1 < n:
        time.sleep(max(0.0, start + pace - time.monotonic()))
print(
    json.dumps(
        {
            "n": n,
            "versions": dict(versions),
            "status": dict(status),
            "errors": errors,
            "ratelimit": dict(ratelimit),
            "seconds": round(slowest, 3),
        }
    )
)
