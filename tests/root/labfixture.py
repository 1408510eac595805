"""Shared helpers for the lab tests: a running lab built from examples/lab plus test pods."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ambientctl.lab import system
from ambientctl.lab.lab import Lab
from tests.root.pod_traffic import PodTraffic

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


class HeldTraffic(PodTraffic):
    """Held, hash-checked connections from a pod plus fresh ones opened all along (issue 15):
    tests/root/pod_traffic.py in the pod's network namespace, the held ones opened over 1 s,
    a 256-byte round every 0.4-0.9 s, a fresh connection every 50 ms. Returns once every held
    connection is set up (`setup`); `check` stops it and asserts its counts."""

    SCRIPT = Path(__file__).with_name("pod_traffic.py")

    def __init__(self, lab: Lab, pod: str, host: str, port: int, held: int) -> None:
        self.held = held
        script = [sys.executable, str(self.SCRIPT), host, str(port), str(held)]
        shape = ["--ramp-every", str(1.0 / held), "--fresh-every", "0.05"]
        super().__init__(lab.exec_argv(pod, [*script, *shape, "--period", "0.4,0.9"]))
        try:
            self.setup = self.expect("up", 60)
        except BaseException:
            self.close()
            raise

    def check(self, *, fresh: int) -> dict[str, Any]:
        """Stop (every held connection does one last round) and assert: all held connections
        set up, none lost or corrupted, at least `fresh` fresh connections, none failed."""
        got = self.command("stop", "done")
        self.proc.wait(10)
        print(f"held traffic: {got}")  # shown with pytest -s
        want = {"held": self.held, "setup_failed": 0, "lost": 0, "corrupted": 0, "fresh_failed": 0}
        assert {k: got[k] for k in want} == want, got
        assert got["rounds"] >= 2 * self.held, got
        assert got["fresh_ok"] >= fresh, got
        return got
