"""One probe check of the lab kubelet (`ambientctl.lab.kubelet`) as a short-lived process: an
exec in the container, or the `TCP` / `HTTP` script below run in the pod's network namespace
(the kubelet never enters a netns itself). `run` bounds it by the probe's timeout plus
`STARTUP` and kills it past that; a check that cannot start counts as failed. The rules (when
a check is due, thresholds, what a result changes) are `ambientctl.lab.probes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
from collections.abc import Mapping, Sequence

from ambientctl.lab import system
from ambientctl.lab.probes import Probe

log = logging.getLogger("ambientctl.lab.kubelet")

STARTUP = 2.0
"""Seconds a check process (nsenter, python) may take to start, on top of a probe's timeout."""
# tcpSocket / httpGet checks, run as `python -I -S -c` in the pod's netns: HOST PORT TIMEOUT
# PATH HEADERS-JSON; exit 0 on success (connected; HTTP status 200-399, as the kubelet).
TCP = """\
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3])).close()
"""
HTTP = """\
import http.client, json, sys
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=float(sys.argv[3]))
c.request("GET", sys.argv[4], headers=dict(json.loads(sys.argv[5])))
sys.exit(0 if 200 <= c.getresponse().status < 400 else 1)
"""


def network_argv(p: Probe, netns: str, pod_ip: str, python: str) -> list[str]:
    """A tcpSocket / httpGet probe's check: `TCP` or `HTTP` run in the pod's netns."""
    script = TCP if p.kind == "tcpSocket" else HTTP
    words = [p.host or pod_ip, str(p.port), str(p.timeout), p.path, json.dumps(p.headers)]
    return system.nsenter(netns, [python, "-I", "-S", "-c", script, *words])


async def run(argv: Sequence[str], env: Mapping[str, str], timeout: float, what: str) -> bool:
    """Whether the check process exits 0 within `timeout` + `STARTUP` seconds (`what` names
    the probe in the log line of a check that cannot start)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(env),
        )
    except OSError as e:
        log.warning("%s: %s", what, e)
        return False
    try:
        return await asyncio.wait_for(proc.wait(), timeout + STARTUP) == 0
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return False
