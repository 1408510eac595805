"""Shared helpers for the lab tests: a running lab built from examples/lab plus test pods."""

from __future__ import annotations

import json
import select
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ambientctl.lab import system
from ambientctl.lab.lab import Lab

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "lab"
SLEEP = "spiffe://cluster.local/ns/demo/sa/sleep"
ECHO = "spiffe://cluster.local/ns/demo/sa/echo"
# outsider-2 has a service account of its own, with no pod on node-1 (the CA check's test).
EXTRA = """
apiVersion: v1
kind: Pod
metadata: {name: outsider-2, namespace: legacy, labels: {app: outsider-2}}
spec:
  serviceAccountName: outsider-2
  nodeName: node-2
  containers: [{name: echo, command: ["python3", "echo.py", "8080"]}]
"""


def manifests(tmp: Path) -> Path:
    out = tmp / "manifests"
    shutil.copytree(EXAMPLES, out)
    (out / "extra.yaml").write_text(EXTRA)
    return out


def build(name: str, tmp: Path) -> Iterator[Lab]:
    lab = Lab(name, state_root=tmp / "state", log=print)
    try:
        lab.up(manifests(tmp))
        yield lab
    finally:
        lab.down()


def call(lab: Lab, pod: str, host: str, port: int, msg: str = "ping") -> tuple[int, str]:
    argv = lab.exec_argv(pod, ["python3", "call.py", host, str(port), msg])
    proc = subprocess.run(argv, cwd=lab.paths.manifests, capture_output=True, timeout=30)
    return proc.returncode, (proc.stdout + proc.stderr).decode()


def log_size(lab: Lab, node: str) -> int:
    path = lab.paths.logs / f"ztunnel-{node}.log"
    return path.stat().st_size if path.exists() else 0


def access(lab: Lab, node: str, since: int = 0) -> list[dict[str, object]]:
    out = []
    with open(lab.paths.logs / f"ztunnel-{node}.log", "rb") as f:
        f.seek(since)
        for line in f.read().decode(errors="replace").splitlines():
            if "ztunnel.access" in line and "{" in line:
                out.append(json.loads(line[line.index("{") :]))
    return out


def wait_access(
    lab: Lab, node: str, since: int, pred: object, timeout: float = 5
) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []

    def check() -> bool:
        found[:] = [a for a in access(lab, node, since) if pred(a)]  # type: ignore[operator]
        return bool(found)

    try:
        system.wait_for(check, timeout=timeout, what=f"access log on {node}")
    except Exception:
        return []
    return found


def metrics(lab: Lab, node: str) -> str:
    plan = lab.load().node(node).plan
    return system.http_get(plan.netns, f"http://{plan.ip}:15020/metrics")[1]


def ztunnel_pids(lab: Lab) -> dict[str, int]:
    return {n.plan.name: n.ztunnel_pid for n in lab.load().nodes}


def redirection(lab: Lab) -> dict[str, str]:
    return {f"{r['namespace']}/{r['name']}": r["redirection"] for r in lab.pods()}


class HeldTraffic:
    """Held, hash-checked connections from a pod and fresh ones opened all along (issue 15).

    One process in the pod's network namespace (system python3, stdlib only) opens `held`
    connections to host:port (the lab's echo: a greeting line, then ``echo: <line>`` per line)
    and sends a SHA-256 line on each every 0.3-0.8 s, checking the echo; meanwhile it opens a
    fresh connection every 50 ms (greeting + one checked line). `result()` stops it and returns
    its counts: held, lost, corrupted, rounds, fresh_ok, fresh_failed, why."""

    SCRIPT = """
import asyncio, hashlib, json, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
st = {"held": 0, "lost": 0, "corrupted": 0, "rounds": 0, "fresh_ok": 0, "fresh_failed": 0,
      "why": []}
stop = asyncio.Event()
def line(tag):
    return hashlib.sha256(tag.encode()).hexdigest().encode() + b"\\n"
async def connect():
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
    greeting = await asyncio.wait_for(r.readline(), 10)
    if not greeting.startswith(b"hello from"):
        raise ValueError(greeting)
    return r, w
async def roundtrip(r, w, data):
    w.write(data)
    got = await asyncio.wait_for(r.readline(), 15)
    return got == b"echo: " + data
async def held(i):
    k = 0
    try:
        r, w = await connect()
        st["held"] += 1
        while True:
            if not await roundtrip(r, w, line(f"{i}/{k}")):
                st["corrupted"] += 1
                return
            st["rounds"] += 1
            k += 1
            if stop.is_set():
                break
            try:
                await asyncio.wait_for(stop.wait(), 0.3 + (i % 20) / 40)
            except asyncio.TimeoutError:
                pass
        w.close()
    except Exception as e:
        st["lost"] += 1
        st["why"].append(f"held {i} round {k}: {e!r}")
async def fresh():
    pending = set()
    async def one(j):
        try:
            r, w = await connect()
            ok = await roundtrip(r, w, line(f"fresh/{j}"))
            w.close()
        except Exception as e:
            st["fresh_failed"] += 1
            st["why"].append(f"fresh {j}: {e!r}")
            return
        st["fresh_ok" if ok else "fresh_failed"] += 1
    j = 0
    while not stop.is_set():
        t = asyncio.ensure_future(one(j))
        pending.add(t)
        t.add_done_callback(pending.discard)
        j += 1
        try:
            await asyncio.wait_for(stop.wait(), 0.05)
        except asyncio.TimeoutError:
            pass
    await asyncio.gather(*pending)
async def main():
    tasks = [asyncio.ensure_future(held(i)) for i in range(n)]
    while st["held"] + st["lost"] + st["corrupted"] < n:
        await asyncio.sleep(0.05)
    print(json.dumps({"up": st["held"]}), flush=True)
    f = asyncio.ensure_future(fresh())
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    stop.set()
    await asyncio.gather(*tasks, f)
    print(json.dumps(st), flush=True)
asyncio.run(main())
"""

    def __init__(self, lab: Lab, pod: str, host: str, port: int, held: int) -> None:
        argv = lab.exec_argv(pod, ["python3", "-c", self.SCRIPT, host, str(port), str(held)])
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.up = int(json.loads(self._line(60))["up"])

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no answer within {timeout} s"
        return self.proc.stdout.readline()

    def result(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        out: dict[str, Any] = json.loads(self._line(60))
        self.proc.wait(10)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
