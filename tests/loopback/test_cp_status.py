"""Findings in the objects' status (controlplane/status.py): the control plane, watching the
Kubernetes API STAND-IN (tests/kubeapi_standin.py) over real HTTP on loopback, writes
``status.validationMessages`` into an AuthorizationPolicy with a misspelt key and an
``Accepted=False`` route condition into an HTTPRoute with a refused field, through the status
subresource; fixing the policy removes its messages. Addresses: 127.0.64.0/24."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.app import ControlPlane, ControlPlaneSettings
from tests.kubeapi_standin import KubeApiStandIn

pytestmark = pytest.mark.timeout(60)
API_IP = "127.0.64.1"


def run(coro: Coroutine[Any, Any, None], timeout: float = 45) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(check: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def policy(source: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-admin", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "db"}},
                 "rules": [{"from": [{"source": source}]}]},
    }  # fmt: skip


ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "reviews", "namespace": "shop"},
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "sectionName": "http"}],
        "rules": [{"backendRefs": [{"name": "reviews", "port": 9080}]}],
    },
}


def test_findings_are_written_into_status(tmp_path: Path) -> None:
    async def main() -> None:
        api = KubeApiStandIn()
        await api.start(API_IP)
        (tmp_path / "kubeconfig").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {"name": "s", "cluster": {"server": f"http://{API_IP}:{api.port}"}}
                    ],
                    "users": [{"name": "cp", "user": {"token": "cp-token"}}],
                    "contexts": [{"name": "c", "context": {"cluster": "s", "user": "cp"}}],
                    "current-context": "c",
                }
            )
        )
        await api.upsert("authorizationpolicies", policy({"principal": ["x"]}))
        await api.upsert("httproutes", ROUTE)
        settings = ControlPlaneSettings(
            listen="127.0.64.2:0",
            debug_listen=None,
            kubernetes=True,
            kubeconfig=tmp_path / "kubeconfig",
            ca_dir=tmp_path / "ca",
            insecure_no_node_auth=True,  # no node proxy in this test; loopback listener
            sync_timeout=10,
        )
        cp = ControlPlane(settings)
        await cp.start()
        try:
            aps = api.objects["authorizationpolicies"]
            key = ("shop", "allow-admin")
            await eventually(lambda: "status" in aps[key], "the policy's status")
            (msg,) = aps[key]["status"]["validationMessages"]
            assert msg["type"] == {"code": "AMB0201", "name": "UnknownField"}
            assert msg["level"] == "ERROR"
            assert "spec.rules[0].from[0].source.principal" in msg["description"]
            assert aps[key]["spec"]["rules"][0]["from"][0]["source"] == {"principal": ["x"]}
            route = api.objects["httproutes"][("shop", "reviews")]
            await eventually(lambda: "status" in api.objects["httproutes"][("shop", "reviews")],
                             "the route's status")  # fmt: skip
            route = api.objects["httproutes"][("shop", "reviews")]
            (parent,) = route["status"]["parents"]
            (cond,) = parent["conditions"]
            assert cond["type"] == "Accepted" and cond["status"] == "False"
            assert (
                cond["reason"] == "UnsupportedValue"
                and "parentRefs[0].sectionName" in cond["message"]
            )
            assert parent["parentRef"]["name"] == "reviews"
            assert any(r.startswith("patch authorizationpolicies/status") for r in api.requests)
            # Fixed: the messages go away; nothing else is written.
            await api.upsert("authorizationpolicies", policy({"principals": ["x"]}))
            await eventually(
                lambda: not (aps[key].get("status") or {}).get("validationMessages"),
                "the messages to be removed",
            )
            assert cp.status_writer is not None and cp.status_writer.errors == []
        finally:
            await cp.stop()
            await api.stop()

    run(main())
