"""`ambient-controlplane` (the real process) refuses to serve without node authentication and
refuses debug endpoints off loopback; metrics go to their own listener (issue 10, item 5).

Addresses: a `tests.helpers.loopback_block`: host 2 (gRPC, and :15014 debug), host 3 (metrics
listener).
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import loopback_block

BIN = Path(sys.executable).parent / "ambient-controlplane"
BLOCK = loopback_block()
CP = BLOCK.ip(2)
METRICS = BLOCK.ip(3)


def argv(tmp: Path, *extra: str) -> list[str]:
    (tmp / "manifests").mkdir(exist_ok=True)
    return [str(BIN), "--manifest-dir", str(tmp / "manifests"), "--ca-dir", str(tmp / "ca"), *extra]


def refused(tmp: Path, *extra: str) -> str:
    proc = subprocess.run(argv(tmp, *extra), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "fatal" in line]
    assert len(lines) == 1, proc.stderr  # one clear line
    assert not (tmp / "ca").exists()  # refused before the CA (or any listener) is created
    return lines[0]


def test_no_node_authentication_is_refused(tmp_path: Path) -> None:
    line = refused(tmp_path, "--listen", f"{CP}:0", "--plaintext", "--debug-listen", "")
    assert "no node authentication" in line
    assert "--node-credentials" in line
    assert "--token-review-account" in line


def test_insecure_flag_only_on_loopback(tmp_path: Path) -> None:
    line = refused(
        tmp_path, "--insecure-no-node-auth", "--listen", "0.0.0.0:0", "--debug-listen", ""
    )
    assert "not a loopback address" in line
    assert "no node authentication" in line


@pytest.mark.parametrize("address", ["0.0.0.0:15014", "[::]:15014", "10.1.2.3:15014", "x:15014"])
def test_debug_listener_only_on_loopback(tmp_path: Path, address: str) -> None:
    creds = tmp_path / "creds.yaml"
    creds.write_text(yaml.safe_dump({"node-a": "token-node-a-0123456789"}))
    line = refused(
        tmp_path,
        "--node-credentials",
        str(creds),
        "--listen",
        f"{CP}:0",
        "--plaintext",
        "--debug-listen",
        address,
    )
    assert "--debug-listen" in line
    assert "not a loopback address" in line


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_insecure_on_loopback_serves_and_metrics_listener_has_no_debug(tmp_path: Path) -> None:
    cmd = argv(
        tmp_path,
        "--insecure-no-node-auth",
        "--listen",
        f"{CP}:15012",
        "--plaintext",
        "--debug-listen",
        f"{CP}:15014",
        "--metrics-listen",
        f"{METRICS}:15014",
    )
    with (tmp_path / "cp.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(f"http://{METRICS}:15014/ready") == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "cp.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "cp.log").read_text()
            time.sleep(0.1)
        assert get(f"http://{METRICS}:15014/metrics") == 200
        assert get(f"http://{METRICS}:15014/debug/config") == 404
        assert get(f"http://{METRICS}:15014/debug/connections") == 404
        assert get(f"http://{CP}:15014/debug/config") == 200
        assert "xDS is served to anyone" in (tmp_path / "cp.log").read_text()
    finally:
        proc.terminate()
        proc.wait(10)
