"""Findings in the objects' status (controlplane/status.py): the control plane, watching the
Kubernetes API STAND-IN (tests/kubeapi_standin.py) over real HTTP on loopback, writes
``status.validationMessages`` into an AuthorizationPolicy and a PeerAuthentication with a
misspelt key, through the status subresource (fixing the policy removes its messages); waypoint
Gateways, kinds the mesh does not implement and a missing CRD are reported as well.
Why the stand-in here: a real API server prunes a misspelt key before the control plane sees it
(the chart's Istio CRDs are typed), and the chart installs no ServiceEntry or Telemetry CRD, so
"a CRD exists for a kind we do not implement" and "a CRD is absent" are set per test here. What
a real server can serve (an HTTPRoute's ``Accepted=False`` condition for a refused field, a
schema-valid AuthorizationPolicy's messages, both cleared when fixed) runs against one in
tests/cluster/test_cp_status.py. Addresses: 127.0.64.0/24."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.app import ControlPlane, ControlPlaneSettings
from tests.helpers import eventually, run
from tests.kubeapi_standin import GROUPS, KubeApiStandIn

pytestmark = pytest.mark.timeout(60)
API_IP = "127.0.64.1"


def policy(source: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-admin", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "db"}},
            "rules": [{"from": [{"source": source}]}],
        },
    }


def kubeconfig(tmp_path: Path, port: int) -> None:
    (tmp_path / "kubeconfig").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "s", "cluster": {"server": f"http://{API_IP}:{port}"}}],
                "users": [{"name": "cp", "user": {"token": "cp-token"}}],
                "contexts": [{"name": "c", "context": {"cluster": "s", "user": "cp"}}],
                "current-context": "c",
            }
        )
    )


def settings(tmp_path: Path) -> ControlPlaneSettings:
    return ControlPlaneSettings(
        listen="127.0.64.2:0",
        debug_listen=None,
        kubernetes=True,
        kubeconfig=tmp_path / "kubeconfig",
        ca_dir=tmp_path / "ca",
        insecure_no_node_auth=True,  # no node proxy in this test; loopback listener
        sync_timeout=10,
    )


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
            await eventually(lambda: "status" in aps[key], what="the policy's status")
            (msg,) = aps[key]["status"]["validationMessages"]
            assert msg["type"] == {"code": "AMB0201", "name": "UnknownField"}
            assert msg["level"] == "ERROR"
            assert "spec.rules[0].from[0].source.principal" in msg["description"]
            assert aps[key]["spec"]["rules"][0]["from"][0]["source"] == {"principal": ["x"]}
            assert any(r.startswith("patch authorizationpolicies/status") for r in api.requests)
            # Fixed: the messages go away; nothing else is written.
            await api.upsert("authorizationpolicies", policy({"principals": ["x"]}))
            await eventually(
                lambda: not (aps[key].get("status") or {}).get("validationMessages"),
                what="the messages to be removed",
            )
            assert cp.status_writer is not None
            assert cp.status_writer.errors == []
        finally:
            await cp.stop()
            await api.stop()

    run(main())


PEER_AUTH = {
    "apiVersion": "security.istio.io/v1",
    "kind": "PeerAuthentication",
    "metadata": {"name": "strict", "namespace": "shop"},
    "spec": {"mtls": {"mode": "STRICT", "modes": "x"}},
}
WAYPOINT_GW = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {"name": "waypoint", "namespace": "shop"},
    "spec": {
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        "addresses": [{"type": "IPAddress", "value": "10.0.0.9"}],
    },
}
INGRESS_GW = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {"name": "ingress", "namespace": "shop"},
    "spec": {
        "gatewayClassName": "istio",
        "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}],
    },
}
SERVICE_ENTRY = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "ServiceEntry",
    "metadata": {"name": "ext", "namespace": "shop"},
    "spec": {"hosts": ["api.example.com"], "ports": [{"number": 443, "name": "https"}]},
}
GRPC_ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "GRPCRoute",
    "metadata": {"name": "grpc", "namespace": "shop"},
    "spec": {
        "parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
        "rules": [{"backendRefs": [{"name": "reviews", "port": 9080}]}],
    },
}


RESERVED_AP = {
    **policy({"principals": ["x"]}),
    "metadata": {"name": "istio_converted_static_strict", "namespace": "shop"},
}


def test_peer_authentication_gateway_and_unimplemented_kinds_in_status(tmp_path: Path) -> None:
    """An AuthorizationPolicy with a reserved name (enforced fail-closed by node proxies; only
    a manifest directory or a lax API server can hold such a name: Kubernetes names have no
    ``_``) has an Error message on ``metadata.name``; PeerAuthentication (validationMessages),
    a waypoint Gateway (Accepted/Programmed False, Gateway API reasons) and kinds the mesh does
    not implement whose CRDs exist (ServiceEntry: validationMessage) are reported in their
    status and on /debug/warnings; a GRPCRoute (its CRD is optional; the kind is implemented)
    is watched and not reported; Telemetry's CRD is absent: nothing is watched or said about
    it; an ingress Gateway (another class's) is reported on /debug/warnings but its status is
    left to its own controller."""

    async def main() -> None:
        groups = {gv for gv in GROUPS if gv != "telemetry.istio.io/v1"}
        api = KubeApiStandIn(groups=groups)
        await api.start(API_IP)
        kubeconfig(tmp_path, api.port)
        await api.upsert("peerauthentications", PEER_AUTH)
        await api.upsert("gateways", WAYPOINT_GW)
        await api.upsert("gateways", INGRESS_GW)
        await api.upsert("serviceentries", SERVICE_ENTRY)
        await api.upsert("grpcroutes", GRPC_ROUTE)
        await api.upsert("authorizationpolicies", RESERVED_AP)
        cp = ControlPlane(settings(tmp_path))
        await cp.start()
        try:
            objs = api.objects
            pa_key = ("shop", "strict")
            await eventually(
                lambda: "status" in objs["peerauthentications"][pa_key], what="PA status"
            )
            msgs = objs["peerauthentications"][pa_key]["status"]["validationMessages"]
            assert [m["type"]["code"] for m in msgs] == ["AMB0201", "AMB0205"]
            assert "spec.mtls.modes" in msgs[0]["description"]
            assert "enforced as STRICT" in msgs[1]["description"]

            ap_key = ("shop", "istio_converted_static_strict")
            aps = objs["authorizationpolicies"]
            await eventually(lambda: "status" in aps[ap_key], what="the reserved AP's status")
            (msg,) = aps[ap_key]["status"]["validationMessages"]
            assert msg["type"] == {"code": "AMB0205", "name": "InvalidValue"}
            assert msg["level"] == "ERROR"
            assert "metadata.name" in msg["description"]
            assert "reserved" in msg["description"]

            gw_key = ("shop", "waypoint")
            await eventually(lambda: "status" in objs["gateways"][gw_key], what="Gateway status")
            conds = {c["type"]: c for c in objs["gateways"][gw_key]["status"]["conditions"]}
            assert conds["Accepted"]["status"] == "False"
            assert conds["Accepted"]["reason"] == "UnsupportedAddress"
            assert "spec.addresses" in conds["Accepted"]["message"]
            assert conds["Programmed"]["status"] == "False"
            assert conds["Programmed"]["reason"] == "Invalid"

            se_key = ("shop", "ext")
            await eventually(lambda: "status" in objs["serviceentries"][se_key], what="SE status")
            (msg,) = objs["serviceentries"][se_key]["status"]["validationMessages"]
            assert msg["type"] == {"code": "AMB0204", "name": "UnsupportedKind"}
            assert "not implemented by ambient-mesh: ignored" in msg["description"]

            assert any("grpcroutes" in r for r in api.requests)
            warnings = cp.warnings()
            assert any("AMB0204" in w for w in warnings["ServiceEntry shop/ext"])
            assert not any("AMB0204" in w for w in warnings.get("GRPCRoute shop/grpc", []))
            assert any("AMB0204" in w for w in warnings["Gateway shop/ingress"])
            assert not any(
                "Telemetry" in ref or "telemetr" in " ".join(w).lower()
                for ref, w in warnings.items()
            )
            assert not any("telemetries" in r for r in api.requests)
            assert "status" not in objs["gateways"][("shop", "ingress")]
            assert cp.status_writer is not None
            assert cp.status_writer.errors == []
        finally:
            await cp.stop()
            await api.stop()

    run(main())
