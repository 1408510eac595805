"""The steps of the user's flow on a kube lab (`lab up --kube`), shared by `ambientctl lab demo
--kube` (ambientctl.lab.demo_kube) and its test (tests/root/test_lab_kube.py).

Owns: `KubeFlow` (install the chart, deploy the demo apps, enrol their namespace, bind a
waypoint to the ``reviews`` service account and apply the seed's route and L7 DENY, each with
its wait for ready; the demo client's calls) and `wait` (poll until a check returns something).

Invariants: every tool call is shown (command and the start of its output) through the lab's
log, as a user would type it; a step returns once what it started is Running, or raises
TimeoutError (a failed tool: LabCommandError); nothing here asserts what a step achieved: the
demo reports it and the test asserts it.
"""

from __future__ import annotations

import functools
import json
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ambientctl.lab.container import REPO
from ambientctl.lab.kubelab import KubeLab

APPS = (
    REPO / "examples/lab/echo.py",
    REPO / "examples/lab/call.py",
    REPO / "examples/lab-waypoint/manifests/reviews.py",
    REPO / "examples/lab-waypoint/manifests/load.py",
)
"""The demo apps' code, mounted into their pods from the ConfigMap ``demo-apps``."""
WAYPOINT_PODS = "gateway.networking.k8s.io/gateway-name=waypoint"
T = TypeVar("T")


def wait(what: str, check: Callable[[], T | None], timeout: float = 120) -> T:
    """`check`'s first truthy result, polled every 0.5 s; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class KubeFlow:
    """One kube lab's flow, step by step (see the module docstring)."""

    def __init__(self, lab: KubeLab) -> None:
        self.lab = lab

    def tool(self, tool: str, *args: str, stdin: bytes | None = None) -> str:
        """kubectl, helm or ambientctl (``ctl``), shown with the first lines of its output."""
        shown = {"ctl": "ambientctl"}.get(tool, tool)
        self.lab.log(f"\n$ {shown} {' '.join(args)}")
        out = self.lab.run_tool(tool, *args, input=stdin)
        for line in out.strip().splitlines()[:12]:
            self.lab.log(f"  {line}")
        return out

    # -- steps ----------------------------------------------------------------------------------
    def install(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """``helm install`` with the chart's defaults; (the Running ztunnel pods, one per node;
        the Running control-plane pod)."""
        self.tool(
            "helm",
            "install",
            "ambient",
            str(REPO / "charts/ambient"),
            "-n",
            "istio-system",
            "--create-namespace",
        )
        zt = wait(
            "a ztunnel pod Running on each node",
            lambda: self.lab.running("istio-system", "app=ztunnel", 2),
        )
        cp = wait(
            "the control plane Running",
            lambda: self.lab.running("istio-system", "app=ambient-controlplane", 1),
        )
        return zt, cp[0]

    def deploy_apps(self) -> None:
        """examples/kube/apps.yaml in namespace ``demo``, their code as a ConfigMap; returns
        once client, both reviews and echo are Running."""
        self.tool("kubectl", "apply", "-f", str(REPO / "examples/kube/apps.yaml"))
        files = [f"--from-file={p}" for p in APPS]
        self.tool("kubectl", "create", "configmap", "demo-apps", "-n", "demo", *files)
        for app, n in (("client", 1), ("reviews", 2), ("echo", 1)):
            wait(f"{app} Running", functools.partial(self.lab.running, "demo", f"app={app}", n))

    def enrol(self) -> None:
        """Label namespace ``demo`` ambient (its running pods get captured)."""
        self.tool("kubectl", "label", "namespace", "demo", "istio.io/dataplane-mode=ambient")

    def waypoint_for_reviews(self) -> str:
        """``ambientctl waypoint apply`` for service account ``reviews`` and the Service label;
        the CLI's output."""
        out = self.tool(
            "ctl", "waypoint", "apply", "-n", "demo", "--for", "all", "--service-account", "reviews"
        )
        self.tool(
            "kubectl", "label", "service", "reviews", "-n", "demo", "istio.io/use-waypoint=waypoint"
        )
        return out

    def waypoint_pod(self) -> dict[str, Any]:
        """The waypoint's pod once Running (waypoint controller -> lab kubelet)."""
        running = functools.partial(self.lab.running, "demo", WAYPOINT_PODS, 1)
        return wait("the waypoint pod Running", running, 120)[0]

    def reviews_policies(self) -> None:
        """The seed's VirtualService for reviews and its L7 DENY of /private, in ``demo``."""
        route = REPO / "examples/lab-waypoint/config/reviews-route.yaml"
        self.tool("kubectl", "apply", "-n", "demo", "-f", str(route))
        deny = (REPO / "examples/lab-waypoint/config/deny-private.yaml").read_text()
        self.tool(
            "kubectl",
            "apply",
            "-n",
            "demo",
            "-f",
            "-",
            stdin=deny.replace("namespace: default", "namespace: demo").encode(),
        )

    # -- the demo client ------------------------------------------------------------------------
    def client(self, *argv: str) -> subprocess.CompletedProcess[bytes]:
        """`argv` run in the ``demo/client`` pod."""
        name = self.lab.pods("demo", "app=client")[0]["metadata"]["name"]
        return subprocess.run(
            self.lab.exec_argv("demo", name, argv), capture_output=True, timeout=120
        )

    def call_echo(self, message: str) -> str | None:
        """The echo service's answer to `message`; None if the call failed."""
        proc = self.client("python3", "/apps/call.py", "echo", "80", message)
        return proc.stdout.decode() if proc.returncode == 0 else None

    def load(self, n: int, *headers: str, path: str = "/") -> dict[str, Any] | None:
        """`n` requests to reviews (load.py's summary: versions, status, errors); None if the
        client failed."""
        url = f"http://reviews:9080{path}"
        proc = self.client("python3", "/apps/load.py", url, str(n), *headers)
        if proc.returncode != 0:
            return None
        result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        return result
