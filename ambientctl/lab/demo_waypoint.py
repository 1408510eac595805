"""`ambientctl lab demo --waypoint`: the seed's VirtualService shifting traffic in the lab.

Builds the lab from examples/lab-waypoint/manifests (reviews v1 on node-1, v2 on node-2, a
client, all ambient) and shows, with N requests each (new connection per request):
1. no waypoint: L4 only, connections balanced over both endpoints by the node proxies;
2. ``ambientctl waypoint apply --lab <lab> --enroll-namespace``: the waypoint pod starts, its
   config comes from the control plane, the node proxies send ``reviews`` traffic to it;
3. the seed's ``reviews-route`` VirtualService (examples/lab-waypoint/config, exactly as in the
   seed) dropped into the lab's manifests: ~90/10 v1/v2, and with ``user-type: beta-tester``
   100% v2;
4. the waypoint's ``istio_requests_total`` (reporter="waypoint");
5. an L7 AuthorizationPolicy targeting the waypoint: ``GET /private`` -> 403, and the app never
   saw the request;
6. the seed's resilience set on one route (examples/lab-waypoint/config/resilience.yaml:
   timeout + retries + circuit breaker + local rate limit), `resilience_demo`: v1 fails
   ``/flaky`` with 503, every client request still gets 200 (retried on v2) and v1 sees exactly
   ``consecutive5xxErrors`` of them (then it is ejected); ``/sleep/5`` is cut at the route
   timeout (504, retried per try); a burst over the limit gets 429s, and every response carries
   ``x-ratelimit-limit``.
Exit 0 only if every step showed what it should; the lab is torn down unless --keep.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from ambientctl.lab.lab import Lab
from ambientctl.waypoint import run as waypoint_run

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lab-waypoint"
WAYPOINT_POD = "default/waypoint-waypoint"
URL = "http://reviews:9080/"


def load(lab: Lab, n: int, *headers: str, url: str = URL) -> dict[str, Any]:
    """Run load.py in the client pod; its JSON summary."""
    argv = lab.exec_argv("default/client", ["python3", "load.py", url, str(n), *headers])
    proc = subprocess.run(argv, cwd=lab.paths.manifests, capture_output=True, timeout=300)
    if proc.returncode != 0:
        return {"n": n, "versions": {}, "status": {}, "errors": n, "stderr": proc.stderr.decode()}
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


def wait_app(lab: Lab, timeout: float = 60) -> bool:
    """Until the reviews pods answer through the mesh (their processes may still be starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = load(lab, 4)
        if r["errors"] == 0 and len(r["versions"]) >= 1:
            return True
        time.sleep(0.3)
    return False


def apply_file(lab: Lab, src: Path) -> Path:
    """`kubectl apply` for the lab: temp file + rename into its manifests."""
    dst = lab.paths.manifests / src.name
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.rename(dst)
    return dst


def wait_waypoint_config(lab: Lab, pred: Any, what: str, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pred(json.loads(lab.waypoint_admin(WAYPOINT_POD, "/debug/config"))):
                return True
        except Exception:
            pass
        time.sleep(0.1)
    lab.log(f"timed out waiting for the waypoint: {what}")
    return False


def within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """`count` successes of `n` within `sigmas` binomial standard deviations of n*p."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def _show(say: Any, title: str, r: dict[str, Any]) -> None:
    v = r.get("versions", {})
    say(
        f"  {title}: v1={v.get('v1', 0)} v2={v.get('v2', 0)} status={r.get('status')} "
        f"errors={r.get('errors')}"
    )


def resilience_demo(lab: Lab, say: Any) -> list[str]:
    """Step 6 (see the module docstring) on a lab whose waypoint serves ``reviews``: apply
    config/resilience.yaml and check it end to end. The failed checks (empty: all held)."""
    failed: list[str] = []

    def check(ok: bool, what: str, got: object) -> None:
        say(f"  {'ok' if ok else 'FAILED'}: {what}: {got}")
        if not ok:
            failed.append(f"{what}: {got}")

    (lab.paths.manifests / "reviews-route.yaml").unlink(missing_ok=True)  # one route for reviews
    apply_file(lab, EXAMPLE / "config" / "resilience.yaml")
    if not wait_waypoint_config(
        lab,
        lambda c: (
            any(x["name"] == "default/reviews-rl" for x in c.get("rate_limits", []))
            and any(t["name"] == "default/reviews-resilience" for t in c["route_tables"])
        ),
        "resilience set",
    ):
        return ["the waypoint never got the resilience set"]
    logs = [lab.paths.logs / f"pod-default-reviews-{v}.log" for v in ("v1", "v2")]
    before = [p.read_text().count("/flaky") for p in logs]
    # Paced under the limit (5/s < 10/s): retries and outlier detection alone decide.
    r = load(lab, 20, "--pace=0.2", url="http://reviews:9080/flaky/x")
    check(
        r["status"] == {"200": 20} and r["versions"] == {"v2": 20},
        "GET /flaky x20 (v1 answers 503): retried on v2",
        r["status"],
    )
    seen = [p.read_text().count("/flaky") - b for p, b in zip(logs, before, strict=True)]
    check(seen[0] == 3, "v1 saw consecutive5xxErrors=3 of them, then was ejected", seen[0])
    check(
        r["ratelimit"] == {"200:10": 20},
        "admitted responses carry x-ratelimit-limit",
        r["ratelimit"],
    )
    r = load(lab, 1, url="http://reviews:9080/sleep/5")
    check(
        r["status"] == {"504": 1} and r["seconds"] < 4.5,
        "GET /sleep/5: route timeout 2.5s (perTryTimeout 1s, retried)",
        (r["status"], r["seconds"]),
    )
    r = load(lab, 60)
    check(
        r["errors"] == 0
        and r["status"].get("429", 0) > 0
        and r["status"].get("200", 0) >= 5
        and r["ratelimit"].get("429:10", 0) == r["status"].get("429", 0),
        "60 back-to-back requests over 10/s: 429 local_rate_limited",
        r["status"],
    )
    metrics = lab.waypoint_admin(WAYPOINT_POD, "/metrics")
    check(
        any(
            ln.startswith("istio_requests_total{")
            and 'response_code="429"' in ln
            and 'response_flags="RL"' in ln
            for ln in metrics.splitlines()
        ),
        "istio_requests_total has 429 with response_flags RL",
        "",
    )
    return failed


def run_waypoint_demo(lab: Lab, *, keep: bool = False, n: int = 200) -> int:
    say = lab.log
    lab.up(EXAMPLE / "manifests")
    ok = True
    try:
        ok &= wait_app(lab)
        say(f"\n1) no waypoint: L4 only ({n} requests, one connection each)")
        r = load(lab, n)
        _show(say, "reviews", r)
        v = r["versions"]
        ok &= r["errors"] == 0 and v.get("v1", 0) > 0 and v.get("v2", 0) > 0

        say(f"\n2) $ ambientctl waypoint apply --lab {lab.name} --enroll-namespace")
        waypoint_args = ["apply", "--lab", lab.name, "--enroll-namespace"]
        ok &= _cli(waypoint_args, say, lab) == 0

        say(
            "\n3) the seed's VirtualService: "
            f"cp {EXAMPLE / 'config' / 'reviews-route.yaml'} {lab.paths.manifests}/"
        )
        apply_file(lab, EXAMPLE / "config" / "reviews-route.yaml")
        ok &= wait_waypoint_config(
            lab,
            lambda c: any(t["name"] == "default/reviews-route" for t in c["route_tables"]),
            "reviews-route",
        )
        r = load(lab, n)
        _show(say, "reviews", r)
        v1 = r["versions"].get("v1", 0)
        ok &= r["errors"] == 0 and within(v1, n, 0.9)
        half = 4 * math.sqrt(0.09 / n)
        say(
            f"  v1 share {v1 / n:.1%} (expected 90%, 4-sigma bound "
            f"{0.9 - half:.1%}..{0.9 + half:.1%})"
        )
        r = load(lab, n // 4, "user-type:beta-tester")
        _show(say, "reviews with user-type: beta-tester", r)
        ok &= r["versions"].get("v2", 0) == n // 4

        say("\n4) the waypoint's metrics (istio_requests_total, reporter=waypoint):")
        metrics = lab.waypoint_admin(WAYPOINT_POD, "/metrics")
        lines = [ln for ln in metrics.splitlines() if ln.startswith("istio_requests_total{")]
        for ln in lines:
            say(f"  {ln}")
        ok &= bool(lines)

        say(
            "\n5) L7 deny at the waypoint: "
            f"cp {EXAMPLE / 'config' / 'deny-private.yaml'} {lab.paths.manifests}/"
        )
        apply_file(lab, EXAMPLE / "config" / "deny-private.yaml")
        ok &= wait_waypoint_config(
            lab,
            lambda c: any(p["name"] == "default/deny-private" for p in c["policies"]),
            "deny-private",
        )
        r = load(lab, 5, url="http://reviews:9080/private/data")
        say(f"  GET /private/data x5: status={r['status']}")
        ok &= r["status"].get("403", 0) == 5
        seen = sum(
            (lab.paths.logs / f"pod-default-reviews-{v}.log").read_text().count("/private")
            for v in ("v1", "v2")
        )
        say(f"  requests for /private the reviews pods saw: {seen}")
        ok &= seen == 0

        say(
            "\n6) the seed's resilience set on one route (timeout + retries + circuit breaker + "
            f"rate limit): cp {EXAMPLE / 'config' / 'resilience.yaml'} {lab.paths.manifests}/"
        )
        ok &= not resilience_demo(lab, say)
    finally:
        if not keep:
            lab.down()
        else:
            say(f"\nlab {lab.name} kept; `ambientctl lab down --name {lab.name}` removes it")
    say("\nwaypoint demo " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1


def _cli(argv: list[str], say: Any, lab: Lab) -> int:
    import argparse

    from ambientctl import waypoint as wp

    p = argparse.ArgumentParser(prog="ambientctl")
    wp.register(p.add_subparsers(dest="group"))
    return waypoint_run(p.parse_args(["waypoint", *argv]), out=say, lab=lab)
