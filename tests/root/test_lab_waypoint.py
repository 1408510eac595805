"""The waypoint in the lab, through the control plane and the CLI (examples/lab-waypoint).

One lab serves the module: reviews v1 (node-1) and v2 (node-2) behind `reviews`, a client on
node-1. The waypoint is added the way an operator does (`ambientctl waypoint apply --lab
--enroll-namespace`), L7 config by dropping files into the lab's manifests. Checks: the seed's
VirtualService split over 400 requests within a 4-sigma binomial bound, the header -> 100% v2,
an L7 AuthorizationPolicy targeting the waypoint -> 403 and the app never sees the request,
waypoint delete -> traffic back to L4 and the pod gone; then (issue 17) JWT and the seed's
resilience set with a local rate limit through a re-applied waypoint; lab down leaves nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambientctl import waypoint as wpcmd
from ambientctl.lab import system
from ambientctl.lab.demo_waypoint import (
    EXAMPLE,
    WAYPOINT_POD,
    apply_file,
    load,
    resilience_demo,
    wait_app,
    within,
)
from ambientctl.lab.lab import XDS_ADDRESS, Lab
from tests.jwtfixtures import jwk, jwks, mint, new_key
from tests.waypoint_fixtures import destination_rule, jwt_required, virtual_service

pytestmark = pytest.mark.timeout(400)

# A rogue source in node-1's netns holding the client's certificate (from the control plane's
# CA with node-1's token: the client pod runs there) sends service traffic straight to a reviews
# pod, skipping the waypoint (HBONE to the pod with `forwarded: host=<bound service>`, as a node
# proxy does for service traffic). Prints the CONNECT status, or "closed".
BYPASS_SCRIPT = """\
import asyncio, sys
from pathlib import Path
from meshcore.caclient import ControlPlaneCAProvider
from meshcore.errors import HboneError
from meshcore.hbone.aio import HboneSettings, PoolKey, connect
from meshcore.identity import SpiffeId
from meshcore.tls import ContextCache
from meshcore.xds import ControlPlaneEndpoint

address, roots, token, pod_ip, expected = sys.argv[1:6]

class Sink:
    def tunnel_data(self, data): pass
    def tunnel_eof(self): pass
    def tunnel_reset(self, code, remote): pass
    def tunnel_pause_source(self): pass
    def tunnel_resume_source(self): pass

async def main() -> None:
    ep = ControlPlaneEndpoint(address=address, token=token, tls_roots=Path(roots).read_bytes())
    provider = ControlPlaneCAProvider(ep)
    cert = await provider.fetch(SpiffeId.parse("spiffe://cluster.local/ns/default/sa/client"))
    await provider.close()
    ctx = ContextCache().client(cert)
    key = PoolKey(source=cert.identity, expected=(SpiffeId.parse(expected),),
                  address=(pod_ip, 15008))
    proto = await connect(key, ctx, HboneSettings(trust_domain="cluster.local"))
    try:
        await proto.open_stream(f"{pod_ip}:9080", [
            ("forwarded", 'for="10.0.0.1:1";host=reviews.default.svc.cluster.local')], Sink())
        print("200")
    except HboneError as err:
        print(getattr(err, "status", "error"))
    except ConnectionError:
        print("closed")

asyncio.run(main())
"""

N = 400


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("labwp")
    lab = Lab("labwp", state_root=tmp / "state", log=print)
    try:
        lab.up(EXAMPLE / "manifests")
        assert wait_app(lab), "the reviews pods never answered"
        yield lab
    finally:
        lab.down()


def waypoint_config(lab: Lab) -> dict[str, object]:
    return dict(json.loads(lab.waypoint_admin(WAYPOINT_POD, "/debug/config")))


def wait_config(lab: Lab, pred: object, what: str) -> None:
    def check() -> bool:
        try:
            return bool(pred(waypoint_config(lab)))  # type: ignore[operator]
        except Exception:
            return False

    system.wait_for(check, timeout=20, what=what, interval=0.1)


def test_waypoint_through_the_control_plane(lab: Lab) -> None:
    # Before: L4 only, both versions reached, no waypoint pod.
    r = load(lab, 100)
    assert r["errors"] == 0, r
    assert set(r["versions"]) == {"v1", "v2"}, r
    assert "default/waypoint-waypoint" not in [f"{p['namespace']}/{p['name']}" for p in lab.pods()]

    assert _apply(lab) == 0
    cfg = waypoint_config(lab)
    assert cfg["waypoint"]["identity"] == "spiffe://cluster.local/ns/default/sa/waypoint"  # type: ignore[index]
    assert "default/reviews.default.svc.cluster.local" in cfg["served_services"]  # type: ignore[operator]
    # The certificate came from the control plane's CA, for the waypoint's node.
    wp = lab.pod("default/waypoint-waypoint")
    cp_log = (lab.paths.logs / "controlplane.log").read_text()
    assert f"signed spiffe://cluster.local/ns/default/sa/waypoint for node {wp.node}" in cp_log

    # The seed's VirtualService, exactly as written.
    apply_file(lab, EXAMPLE / "config" / "reviews-route.yaml")
    wait_config(
        lab,
        lambda c: any(t["name"] == "default/reviews-route" for t in c["route_tables"]),
        "reviews-route",
    )
    r = load(lab, N)
    assert r["errors"] == 0, r
    assert r["status"] == {"200": N}, r
    v1 = r["versions"].get("v1", 0)
    assert within(v1, N, 0.9), f"v1={v1} of {N}: outside 4 sigma of 90%"
    r = load(lab, 100, "user-type:beta-tester")
    assert r["versions"] == {"v2": 100}, r

    metrics = lab.waypoint_admin(WAYPOINT_POD, "/metrics")
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("istio_requests_total{")
        and 'reporter="waypoint"' in line
        and 'response_code="200"' in line
    )
    assert total >= N + 100

    # L7 deny at the waypoint: 403, and the app never sees the request.
    marks = {v: _log(lab, v).count("/private") for v in ("v1", "v2")}
    apply_file(lab, EXAMPLE / "config" / "deny-private.yaml")
    wait_config(
        lab,
        lambda c: any(p["name"] == "default/deny-private" for p in c["policies"]),
        "deny-private",
    )
    r = load(lab, 20, url="http://reviews:9080/private/x")
    assert r["status"] == {"403": 20}, r
    r = load(lab, 20, url="http://reviews:9080/public")
    assert r["status"] == {"200": 20}, r
    assert {v: _log(lab, v).count("/private") for v in ("v1", "v2")} == marks

    # No bypass: straight to the reviews-v2 pod with the bound service -> 401 from its node
    # proxy; the same request as a plain client (through the node proxy) still works.
    v2 = lab.pod("default/reviews-v2")
    argv = lab.node_argv(
        "node-1",
        [
            sys.executable,
            "-c",
            BYPASS_SCRIPT,
            XDS_ADDRESS,
            str(lab.paths.roots),
            lab.paths.node_token("node-1").read_text().strip(),
            v2.ip,
            "spiffe://cluster.local/ns/default/sa/reviews",
        ],
    )
    proc = subprocess.run(argv, capture_output=True, timeout=60, cwd=Path(__file__).parents[2])
    assert proc.stdout.decode().strip().splitlines()[-1:] == ["401"], proc.stderr.decode()

    # Delete: the binding goes first, then the pod; traffic is L4 again (no L7 deny).
    assert _run(lab, "delete") == 0
    assert "default/waypoint-waypoint" not in [f"{p['namespace']}/{p['name']}" for p in lab.pods()]
    r = load(lab, 20, url="http://reviews:9080/private/x")
    assert r["status"] == {"200": 20}, r
    assert not system.netns_exists(wp.netns)


def _jwt_policies(jwks_text: str) -> str:
    rules = f"""[{{issuer: "https://issuer.lab", jwks: '{jwks_text}'}}]"""
    return jwt_required(rules, paths='["/secure*"]')


def test_jwt_rate_limit_and_the_resilience_set(lab: Lab, tmp_path: Path) -> None:
    """Issue 17 through the lab's waypoint, configured by files in its manifests: a
    RequestAuthentication with an AuthorizationPolicy requiring a token on /secure (no token
    403, a valid token 200, a bad token 401; /secure, since the first test's deny-private stays
    in the manifests), then the seed's resilience set on one route, the demo's step 6
    (examples/lab-waypoint/config/resilience.yaml: retries on v1's 503s, outlier ejection after
    exactly 3, the route timeout, 429s over the limit with the RL flag in the waypoint's
    metrics, x-ratelimit-limit on admitted and refused responses)."""
    assert _apply(lab) == 0
    key = new_key("RS256")
    token = mint(
        key,
        "RS256",
        {"iss": "https://issuer.lab", "sub": "alice", "exp": time.time() + 3600},
        kid="k1",
    )
    jwt_file = tmp_path / "jwt.yaml"
    jwt_file.write_text(_jwt_policies(jwks(jwk(key, "k1"))))
    apply_file(lab, jwt_file)
    wait_config(
        lab,
        lambda c: {"default/jwt", "default/require-jwt"} <= {p["name"] for p in c["policies"]},
        "jwt policies",
    )
    private = "http://reviews:9080/secure/x"
    assert load(lab, 5, url=private)["status"] == {"403": 5}
    r = load(lab, 5, f"authorization:Bearer {token}", url=private)
    log = lab.paths.logs / "pod-default-waypoint-waypoint.log"
    assert r["status"] == {"200": 5}, (r, waypoint_config(lab)["policies"], log.read_text()[-3000:])
    r = load(lab, 5, "authorization:Bearer not.a.token", url="http://reviews:9080/public")
    assert r["status"] == {"401": 5}, r
    assert load(lab, 5, url="http://reviews:9080/public")["status"] == {"200": 5}
    (lab.paths.manifests / jwt_file.name).unlink()

    failed = resilience_demo(lab, print)
    assert not failed, (
        failed,
        lab.paths.logs.joinpath("pod-default-waypoint-waypoint.log").read_text()[-3000:],
    )
    (lab.paths.manifests / "resilience.yaml").unlink()
    assert _run(lab, "delete") == 0


L7_CLIENT = Path(__file__).with_name("lab_l7_client.py")

SUBSETS = """
subsets:
- {name: v1, labels: {version: v1}}
- {name: v2, labels: {version: v2}}
"""
COOKIE_AND_MIRROR = (
    destination_rule(
        """
trafficPolicy:
  loadBalancer:
    consistentHash:
      httpCookie: {name: session, ttl: 60s, path: /}
      maglev: {tableSize: 65537}
"""
        + SUBSETS
    )
    + "---\n"
    + virtual_service(
        """
- match: [{uri: {prefix: /mirror}}]
  route: [{destination: {host: reviews, subset: v1}}]
  mirror: {host: reviews, subset: v2}
  mirrorPercentage: {value: 100}
- route: [{destination: {host: reviews}}]
""",
        name="reviews-l7",
    )
)

LOCALITY_DR = destination_rule(
    """
trafficPolicy:
  outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 120s,
                     maxEjectionPercent: 100}
  loadBalancer: {localityLbSetting: {enabled: true}}
"""
    + SUBSETS
)


def _nodes(zones: dict[str, str]) -> str:
    return "".join(
        f"""---
apiVersion: v1
kind: Node
metadata:
  name: {node}
  labels: {{topology.kubernetes.io/region: lab-region, topology.kubernetes.io/zone: {zone}}}
"""
        for node, zone in zones.items()
    )


def _client(lab: Lab, *args: str) -> dict[str, Any]:
    argv = lab.exec_argv("default/client", [sys.executable, str(L7_CLIENT), *args])
    proc = subprocess.run(argv, capture_output=True, timeout=120, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return dict(json.loads(proc.stdout.decode().strip().splitlines()[-1]))


def _oidc_policies(issuer: str) -> str:
    return jwt_required(f'[{{issuer: "{issuer}"}}]', paths='["/secure*"]', name="oidc")


def test_issue17_l7_features_through_the_lab_waypoint(lab: Lab, tmp_path: Path) -> None:
    """Issue 17 end to end through the lab's waypoint (config by files in the lab's
    manifests, through the control plane): WebSocket over HTTP/2 (RFC 8441) to the HTTP/1.1
    app, with policy on the handshake; Expect: 100-continue; the generated consistent-hash
    cookie pins sessions; a 2 MiB body mirrored whole to v2; RequestAuthentication keys by
    OpenID discovery from an issuer in the mesh; locality from Node labels: traffic stays in
    the waypoint's zone, and fails over to the other zone once the local endpoint is ejected."""
    assert _apply(lab) == 0
    apply_file(lab, EXAMPLE / "config" / "deny-private.yaml")  # (also the first test's)
    wait_config(
        lab,
        lambda c: any(p["name"] == "default/deny-private" for p in c["policies"]),
        "deny-private",
    )
    files: list[Path] = []

    def drop(name: str, text: str) -> None:
        src = tmp_path / name
        src.write_text(text)
        files.append(apply_file(lab, src))

    try:
        # 1. WebSocket over HTTP/2 and Expect (the first test's deny-private applies).
        r = _client(lab, "ws-h2", "/ws")
        assert r["settings"] == 1, r
        assert r["status"] == "200", r
        assert len(r["echo"]) == 3, r
        assert all(e.endswith(f":m{i}") for i, e in enumerate(r["echo"])), r
        assert _client(lab, "ws-h2", "/private/ws")["status"] == "403"
        assert _client(lab, "expect", "/upload") == {
            "interim": "HTTP/1.1 100 Continue",
            "final": "HTTP/1.1 200 OK",
        }
        r = _client(lab, "expect", "/private/upload")
        assert r["interim"].startswith("HTTP/1.1 403"), r

        # The seed's VirtualService (first test) would route by subset: one route for reviews.
        (lab.paths.manifests / "reviews-route.yaml").unlink(missing_ok=True)
        # 2. Cookie generation + a mirrored 2 MiB body. (File names sort after demo.yaml: the
        # manifests' later file wins for the `reviews` DestinationRule, as a re-apply would.)
        drop("reviews-l7.yaml", COOKIE_AND_MIRROR)
        wait_config(
            lab,
            lambda c: any(t["name"] == "default/reviews-l7" for t in c["route_tables"]),
            "cookie + mirror",
        )
        time.sleep(1)  # the DestinationRule arrives with the same push; a moment to be sure
        sessions = _client(lab, "cookie", "16")["sessions"]
        for sess in sessions:
            assert sess["set_cookie"].startswith('session="'), sess
            assert sess["set_cookie"].endswith("; Max-Age=60; Path=/; HttpOnly"), sess
            assert len(set(sess["versions"][1:])) == 1, sess  # the cookie pins the session
        assert {s["versions"][1] for s in sessions} == {"v1", "v2"}  # sessions spread
        size = 2 * 1024 * 1024  # > 64 KiB, the old limit; the copy streams (tap: 4 MiB lag)
        r = _client(lab, "post", "/mirror/big", str(size))
        assert r["status"] == 200, r
        assert json.loads(r["body"])["version"] == "v1", r
        system.wait_for(
            lambda: "request POST /mirror/big from" in _log(lab, "v2"),
            timeout=20,
            what="the mirrored POST at v2",
        )
        line = next(x for x in _log(lab, "v2").splitlines() if "POST /mirror/big" in x)
        assert line.endswith(f"len={size}"), line

        # 3. OpenID discovery: the issuer is the v1 pod itself (a tiny provider in reviews.py).
        (lab.paths.manifests / "reviews-l7.yaml").unlink()
        files.remove(lab.paths.manifests / "reviews-l7.yaml")
        key = new_key("ES256")
        (lab.paths.manifests / "oidc-keys.txt").write_text(jwks(jwk(key, "lab-1")))
        issuer = f"http://{lab.pod('default/reviews-v1').ip}:9080/oidc"
        drop("oidc.yaml", _oidc_policies(issuer))
        wait_config(
            lab,
            lambda c: (
                {"default/oidc", "default/require-oidc"} <= {p["name"] for p in c["policies"]}
            ),
            "oidc policies",
        )
        token = mint(
            key, "ES256", {"iss": issuer, "sub": "bob", "exp": time.time() + 600}, kid="lab-1"
        )
        secure = "http://reviews:9080/secure/x"
        assert load(lab, 3, url=secure)["status"] == {"403": 3}
        r = load(lab, 3, f"authorization:Bearer {token}", url=secure)
        assert r["status"] == {"200": 3}, (
            r,
            lab.paths.logs.joinpath("pod-default-waypoint-waypoint.log").read_text()[-3000:],
        )
        assert "GET /oidc/.well-known/openid-configuration" in _log(lab, "v1")
        (lab.paths.manifests / "oidc.yaml").unlink()
        files.remove(lab.paths.manifests / "oidc.yaml")

        # 4. Locality: the waypoint's node is zone a, the other node zone b.
        wp_node = lab.pod(WAYPOINT_POD).node
        other = "node-2" if wp_node == "node-1" else "node-1"
        local = "v1" if wp_node == "node-1" else "v2"
        remote = "v2" if local == "v1" else "v1"
        drop("nodes.yaml", _nodes({wp_node: "zone-a", other: "zone-b"}))
        drop("reviews-locality.yaml", LOCALITY_DR)
        system.wait_for(
            lambda: load(lab, 10)["versions"] == {local: 10},
            timeout=30,
            what="traffic kept in the waypoint's zone",
            interval=0.5,
        )
        r = load(lab, 40)
        assert r["versions"] == {local: 40}, r
        # The local endpoint fails: ejected after 2 errors, traffic fails over to zone b.
        r = load(lab, 10, url=f"http://reviews:9080/fail-{local}/x")
        assert r["status"].get("200", 0) >= 8, r
        r = load(lab, 20)
        assert r["versions"] == {remote: 20}, r
    finally:
        for f in files:
            f.unlink(missing_ok=True)
        (lab.paths.manifests / "oidc-keys.txt").unlink(missing_ok=True)
    assert _run(lab, "delete") == 0


def _log(lab: Lab, version: str) -> str:
    return (lab.paths.logs / f"pod-default-reviews-{version}.log").read_text()


def _run(lab: Lab, *argv: str) -> int:
    """`ambientctl waypoint ARGV --lab <lab>` on this test's lab (its own state root)."""
    p = argparse.ArgumentParser(prog="ambientctl")
    wpcmd.register(p.add_subparsers(dest="group"))
    args = p.parse_args(["waypoint", *argv, "--lab", lab.name])
    return wpcmd.run(args, lab=lab)


def _apply(lab: Lab) -> int:
    return _run(lab, "apply", "--enroll-namespace")


def test_down_leaves_nothing(tmp_path: Path) -> None:
    lab = Lab("labwp2", state_root=tmp_path / "state", log=print)
    lab.up(EXAMPLE / "manifests")
    try:
        assert _run(lab, "apply", "--enroll-namespace") == 0
        wp = lab.pod("default/waypoint-waypoint")
        assert system.alive(wp.pid)
        # `waypoint status -o json`: the same facts as the text, as data.
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert _run(lab, "status", "-o", "json") == 0
        status = json.loads(out.getvalue())
        assert status["ready"] is True
        assert status["pod"] == {"name": "default/waypoint-waypoint", "node": wp.node, "ip": wp.ip}
        assert status["identity"].endswith("/ns/default/sa/waypoint")
    finally:
        lab.down()
    assert not system.alive(wp.pid)
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "labwp2" not in names
    assert not lab.paths.root.exists()
    assert not Path(f"/etc/netns/{wp.netns}").exists()
