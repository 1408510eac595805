"""Where a waypoint's operator endpoints listen (issue 10, item 5): the real `waypoint` process,
started with the admin/debug flags of the Deployment the controller makes. Prometheus scraping
the pod IP at 15020 gets metrics and readiness; the debug views (every route and policy) are on
127.0.0.1:15000 only, and a non-loopback debug address is refused at start.

Addresses: the "pod IP" is WAYPOINT_IP (127.0.84.10) of the waypoint harness; the process runs
in the test's private network namespace, so 0.0.0.0:15020 is free.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from controlplane.waypoints import WaypointSettings, desired_objects
from tests.loopback.test_waypoint_harness import WAYPOINT_IP, static_waypoint_argv


def deployment_flags() -> dict[str, str]:
    gw = {
        "metadata": {"name": "waypoint", "namespace": "default", "uid": "u-1"},
        "spec": {"gatewayClassName": "istio-waypoint"},
    }
    dep = desired_objects(gw, WaypointSettings(image="img:1")).deployment
    tmpl = dep["spec"]["template"]
    (container,) = tmpl["spec"]["containers"]
    args = container["args"]
    assert container["readinessProbe"]["httpGet"]["port"] == 15020
    assert tmpl["metadata"]["annotations"]["prometheus.io/port"] == "15020"
    return {flag: args[args.index(flag) + 1] for flag in ("--admin", "--debug-listen")}


def status(url: str) -> int | str:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:  # connection refused: nothing listens there
        return type(e).__name__


def test_controller_waypoint_serves_metrics_on_pod_ip_and_debug_on_localhost(
    tmp_path: Path,
) -> None:
    flags = deployment_flags()
    assert flags == {"--admin": "0.0.0.0:15020", "--debug-listen": "127.0.0.1:15000"}
    argv = static_waypoint_argv(tmp_path, *(x for kv in flags.items() for x in kv))
    with (tmp_path / "wp.log").open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while status(f"http://{WAYPOINT_IP}:15020/healthz/ready") != 200:
            assert proc.poll() is None, (tmp_path / "wp.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "wp.log").read_text()
            time.sleep(0.1)
        pod = f"http://{WAYPOINT_IP}"
        assert status(f"{pod}:15020/stats/prometheus") == 200
        assert status(f"{pod}:15020/metrics") == 200
        assert status(f"{pod}:15020/debug/config") == 404
        assert status(f"{pod}:15020/debug/clusters") == 404
        assert status(f"{pod}:15000/debug/config") == "URLError"  # nothing on the pod IP
        assert status("http://127.0.0.1:15000/debug/config") == 200
        assert status("http://127.0.0.1:15000/debug/clusters") == 200
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.parametrize("address", ["0.0.0.0:15000", "[::]:15000", "10.0.0.9:15000"])
def test_debug_listener_off_loopback_is_refused(tmp_path: Path, address: str) -> None:
    proc = subprocess.run(
        static_waypoint_argv(tmp_path, "--admin", "", "--debug-listen", address),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "--debug-listen" in proc.stderr
    assert "not a loopback address" in proc.stderr
