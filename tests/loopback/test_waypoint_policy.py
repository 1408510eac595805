"""L7 authorization, telemetry and trace context at the waypoint, on loopback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from tests.loopback.test_waypoint_harness import REVIEWS, SLEEP, run, waypoint_mesh
from tests.waypoint_fixtures import REVIEWS_DR, SEED_VS

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*", "*/secret"]}}]
  - when: [{key: "request.headers[x-evil]", values: ["*"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep-reads, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/sleep"]}}]
    to: [{operation: {methods: [GET, HEAD], paths: ["/reviews/{*}", "/public/{**}", "/admin"]}}]
  - from: [{source: {namespaces: [default]}}]
    to: [{operation: {methods: [POST], ports: ["9080"]}}]
    when: [{key: "request.headers[x-token]", values: [letmein]}]
"""


def test_l7_deny_is_403_and_never_reaches_the_app(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, SEED_VS, REVIEWS_DR, POLICIES) as mesh:
            pods = mesh.backends.pods

            def served() -> int:
                return sum(len(p.requests) for p in pods.values())

            async with mesh.session() as s:
                cases = [
                    ("GET", "/reviews/1", {}, 200),
                    ("GET", "/public/a/b/c", {}, 200),
                    ("GET", "/admin", {}, 403),  # DENY wins over the ALLOW listing it
                    ("GET", "/admin/users", {}, 403),
                    ("GET", "/public/../admin", {}, 403),  # normalised before policy
                    ("GET", "/public/x/secret", {}, 403),
                    ("GET", "/reviews/1", {"x-evil": "1"}, 403),
                    ("GET", "/reviews/1/2", {}, 403),  # {*} is one segment: no ALLOW
                    ("DELETE", "/reviews/1", {}, 403),
                    ("POST", "/reviews/1", {}, 403),  # no token
                    ("POST", "/reviews/1", {"x-token": "letmein"}, 200),
                ]
                for method, path, headers, want in cases:
                    before = served()
                    data = b"body" if method == "POST" else None
                    url = f"{REVIEWS}{path}"
                    async with s.request(method, url, headers=headers, data=data) as r:
                        body = await r.text()
                        assert r.status == want, (method, path, headers, r.status, body)
                    if want == 403:
                        assert body == "RBAC: access denied"
                        assert served() == before, f"{method} {path} reached the app"
                    else:
                        assert served() == before + 1
                # A denied request with a body keeps the connection usable afterwards.
                async with s.post(f"{REVIEWS}/x", data=b"y" * 5000) as r:
                    assert r.status == 403
                async with s.get(f"{REVIEWS}/reviews/2") as r:
                    assert r.status == 200

    run(main())


CUSTOM = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: default}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  action: CUSTOM
  provider: {name: my-ext-authz}
  rules: [{to: [{operation: {paths: ["/ext/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: default}
spec:
  targetRefs: [{kind: Service, name: reviews}]
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: selector-form, namespace: default}
spec:
  selector: {matchLabels: {istio.io/gateway-name: waypoint}}
  action: DENY
  rules: [{to: [{operation: {methods: [PUT]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: not-for-waypoints, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules: [{}]
"""


def test_custom_fails_closed_audit_ignored_selector_form_applies(tmp_path: Path) -> None:
    async def main() -> None:
        async with waypoint_mesh(tmp_path, CUSTOM) as mesh, mesh.session() as s:
            async with s.get(f"{REVIEWS}/ext/a") as r:
                assert r.status == 403
            async with s.put(f"{REVIEWS}/x", data=b"1") as r:
                assert r.status == 403
            async with s.get(f"{REVIEWS}/other") as r:
                assert r.status == 200  # AUDIT decides nothing; app selector is not ours
            warnings = " ".join(mesh.waypoint.ctx.warnings)
            assert "CUSTOM" in warnings
            assert "AUDIT" in warnings

    run(main())


def test_metrics_access_log_and_trace_context(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    incoming_trace = "4bf92f3577b34da6a3ce929d0e0e4736"

    async def main() -> None:
        async with waypoint_mesh(tmp_path, SEED_VS, REVIEWS_DR) as mesh:
            mesh.waypoint.ctx.metrics.log_enabled = True
            async with mesh.session() as s:
                tp = f"00-{incoming_trace}-00f067aa0ba902b7-01"
                h7 = {"user-type": "beta-tester", "traceparent": tp}
                async with s.get(f"{REVIEWS}/reviews/7", headers=h7) as r:
                    assert r.status == 200
                    await r.read()
                h8 = {"user-type": "beta-tester", "x-test-status": "503"}
                async with s.get(f"{REVIEWS}/reviews/8", headers=h8) as r:
                    assert r.status == 503
            seen = mesh.backends.pods["v2"].requests[0]["headers"]
            version, trace, parent, flags = seen["traceparent"].split("-")
            assert (version, trace, flags) == ("00", incoming_trace, "01")
            assert parent != "00f067aa0ba902b7"
            assert len(parent) == 16  # the waypoint's span
            text = generate_latest(mesh.waypoint.ctx.metrics.registry).decode()
            lines = [x for x in text.splitlines() if x.startswith("istio_requests_total{")]
            ok = next(x for x in lines if 'response_code="200"' in x)
            for want in (
                'reporter="waypoint"',
                f'source_principal="{SLEEP}"',
                'source_workload="client"',
                'destination_service="reviews.default.svc.cluster.local"',
                'destination_workload="reviews-v2"',
                'destination_version="v2"',
                'request_protocol="http"',
            ):
                assert want in ok, (want, ok)
            assert ok.endswith(" 1.0")
            # 503 with the default retry policy: 3 tries, one request counted.
            bad = next(x for x in lines if 'response_code="503"' in x)
            assert bad.endswith(" 1.0")
            assert "istio_request_duration_milliseconds_bucket{" in text
            assert "istio_request_bytes_count{" in text
            assert "istio_response_bytes_sum{" in text

    with caplog.at_level(logging.INFO, logger="waypoint.access"):
        run(main())
    entries = [json.loads(r.getMessage()) for r in caplog.records if r.name == "waypoint.access"]
    first = next(e for e in entries if e["path"] == "/reviews/7")
    assert first["trace_id"] == incoming_trace
    assert first["src.identity"] == SLEEP
    assert first["response_code"] == 200
    assert first["dst.workload"] == "reviews-v2"
    assert first["attempts"] == 1
    retried = next(e for e in entries if e["path"] == "/reviews/8")
    assert retried["attempts"] == 3
    assert retried["response_code"] == 503


DENY_ALL_OF = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-all-{name}, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: {name}}}]
  action: DENY
  rules: [{{}}]
"""


def test_a_policy_change_applies_to_the_next_request_on_the_same_connection(
    tmp_path: Path,
) -> None:
    """The handler derives the policies applicable to a service once per service and config
    (session 9): a new config must be evaluated by the very next request (no stale list kept
    from the config before, in either direction), and a policy of another service never
    applies."""

    async def main() -> None:
        other = DENY_ALL_OF.format(name="ratings")
        async with (
            waypoint_mesh(tmp_path, SEED_VS, REVIEWS_DR, other) as mesh,
            mesh.session() as s,
        ):

            async def status(path: str = "/reviews/1") -> int:
                async with s.get(f"{REVIEWS}{path}") as r:
                    await r.read()
                    return r.status

            assert [await status(), await status()] == [200, 200]
            mesh.set_config(SEED_VS, REVIEWS_DR, other, DENY_ALL_OF.format(name="reviews"))
            assert [await status(), await status()] == [403, 403]
            mesh.set_config(SEED_VS, REVIEWS_DR, other)
            assert await status() == 200
            mesh.set_config(SEED_VS, REVIEWS_DR, POLICIES)
            assert [await status("/admin"), await status()] == [403, 200]

    run(main())
