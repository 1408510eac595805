"""Load generator of the waypoint demo: N HTTP requests to a URL, counted by app version.

Usage (inside a pod): python3 load.py URL N [Header:value ...]. Each request uses a NEW
connection (so L4 balancing is visible too, which is per connection). Prints one JSON line:
``{"n": N, "versions": {"v1": ..}, "status": {"200": ..}, "errors": ..}``.
"""

from __future__ import annotations

import http.client
import json
import sys
import urllib.parse
from collections import Counter

url = urllib.parse.urlsplit(sys.argv[1])
n = int(sys.argv[2])
headers = dict(h.split(":", 1) for h in sys.argv[3:])
versions: Counter[str] = Counter()
status: Counter[str] = Counter()
errors = 0
for _ in range(n):
    try:
        conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=10)
        conn.request("GET", url.path or "/", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        status[str(resp.status)] += 1
        if resp.status == 200:
            versions[json.loads(body).get("version", "?")] += 1
    except (OSError, ValueError, http.client.HTTPException):
        errors += 1
print(json.dumps({"n": n, "versions": dict(versions), "status": dict(status), "errors": errors}))
