"""`ambientctl` as istioctl users type it (issue 12): plural section names, ``-o short``,
``-n``/``-A``, ``--context``/``--kubeconfig`` anywhere, ``version``, ``x precheck``, istioctl's
analyze exit code, and each CLI defect the issue lists: a clear one-line error and a non-zero
exit, never a traceback."""

from __future__ import annotations

import argparse
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from ambientctl.main import main, parser

DUMP = {
    "node": "node-a",
    "workloads": [
        {"uid": "a", "name": "sleep", "namespace": "apps", "serviceAccount": "sleep"},
        {"uid": "b", "name": "echo", "namespace": "other", "serviceAccount": "echo"},
    ],
    "services": [],
    "policies": [],
    "certificates": [],
    "connections": [],
}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture
def dump(tmp_path: Path) -> Path:
    path = tmp_path / "dump.json"
    path.write_text(json.dumps(DUMP))
    return path


@pytest.mark.parametrize("section", ["workloads", "workload"])
def test_ztunnel_config_plural_sections_with_singular_aliases(
    section: str, dump: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "ztunnel-config", section, "--file", str(dump), "-o", "short")
    assert code == 0
    assert "POD NAME" in out
    assert "sleep" in out
    assert "echo" in out


def test_ztunnel_config_namespace_filter_and_all_namespaces(
    dump: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "zc", "workloads", "--file", str(dump), "-n", "apps", "-o", "json")
    assert code == 0
    assert [w["name"] for w in json.loads(out)] == ["sleep"]
    code, out, _ = run(capsys, "zc", "workloads", "--file", str(dump), "-A", "-o", "yaml")
    assert code == 0
    assert {w["name"] for w in yaml.safe_load(out)} == {"sleep", "echo"}
    # Certificates by their identity's namespace, connections by their source's.
    sleep, echo = (
        "spiffe://cluster.local/ns/apps/sa/sleep",
        "spiffe://cluster.local/ns/other/sa/echo",
    )
    doc = {
        **DUMP,
        "certificates": [
            {"identity": sleep, "state": "available"},
            {"identity": echo, "state": "available"},
        ],
        "connections": [
            {"source": sleep, "destination": "10.0.0.2:15008", "peer": echo},
            {"source": echo, "destination": "10.0.0.1:15008", "peer": sleep},
        ],
    }
    dump.write_text(json.dumps(doc))
    code, out, _ = run(
        capsys, "zc", "certificates", "--file", str(dump), "-n", "apps", "-o", "json"
    )
    assert [c["identity"] for c in json.loads(out)] == [sleep]
    code, out, _ = run(
        capsys, "zc", "connections", "--file", str(dump), "-n", "other", "-o", "json"
    )
    assert [c["source"] for c in json.loads(out)] == [echo]
    code, out, _ = run(capsys, "zc", "certificates", "--file", str(dump), "-A", "-o", "json")
    assert len(json.loads(out)) == 2


def test_global_flags_anywhere(
    dump: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    for argv in (
        ["--context", "kind-a", "zc", "workloads", "--file", str(dump)],
        [
            "zc",
            "workloads",
            "--file",
            str(dump),
            "--context=kind-a",
            "--kubeconfig",
            str(kubeconfig),
        ],
    ):
        code, out, _ = run(capsys, *argv)
        assert code == 0
        assert "sleep" in out
    code, _, err = run(capsys, "zc", "workloads", "--file", str(dump), "--kubeconfig", "/nope")
    assert code != 0
    assert err.strip() == "ambientctl: --kubeconfig /nope: no such file"


class _Version(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"component": "controlplane", "version": "9.9.9"}).encode()
        self.send_response(200 if self.path == "/version" else 404)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def controlplane() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Version)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_version_client_and_control_plane(
    controlplane: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "version", "--controlplane", controlplane)
    assert code == 0
    assert out.splitlines()[0].startswith("client version: ")
    assert out.splitlines()[1] == "control plane version: 9.9.9"
    code, out, _ = run(capsys, "version", "--controlplane", controlplane, "-o", "json")
    assert json.loads(out)["controlPlaneVersion"] == {"version": "9.9.9"}
    code, out, _ = run(capsys, "version", "--controlplane", "127.0.0.1:1")
    assert code == 0
    assert "control plane version: unreachable" in out
    code, out, _ = run(capsys, "version", "--no-remote")
    assert code == 0
    assert len(out.splitlines()) == 1


def fake_node(tmp_path: Path, release: str, mounts: str, conflists: dict[str, object]) -> Path:
    proc = tmp_path / "proc"
    (proc / "sys/kernel").mkdir(parents=True)
    (proc / "sys/kernel/osrelease").write_text(release + "\n")
    (proc / "mounts").write_text(mounts)
    cni = tmp_path / "net.d"
    cni.mkdir()
    for name, doc in conflists.items():
        (cni / name).write_text(json.dumps(doc))
    return tmp_path


BPF = "bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime 0 0\n"
BRIDGE = {"cniVersion": "1.0.0", "name": "k8s", "plugins": [{"type": "bridge"}]}


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No kubeconfig anywhere: precheck's Kubernetes checks are tests/cluster/test_precheck.py."""
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def precheck(capsys: pytest.CaptureFixture[str], root: Path) -> tuple[int, str, str]:
    return run(
        capsys, "x", "precheck", "--proc", str(root / "proc"), "--cni-conf-dir", str(root / "net.d")
    )


def test_precheck_passes_on_a_good_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = fake_node(tmp_path, "6.1.0-18-amd64", BPF, {"10-bridge.conflist": BRIDGE})
    code, out, err = precheck(capsys, root)
    assert code == 0, out
    assert "\u2714 kernel: 6.1.0-18-amd64" in out
    assert "\u2714 eBPF" in out
    assert "\u2714 CNI" in out
    assert "! Kubernetes: no cluster configured" in out  # said, not silently skipped
    assert "No issues found" in err
    code, _out, err = run(capsys, "x", "precheck", "--context", "prod")
    assert code == 1
    assert err == "ambientctl: --context prod: no kubeconfig (give --kubeconfig)\n"


@pytest.mark.parametrize(
    ("node", "finding"),
    [
        (("5.4.0", BPF, {"10-bridge.conflist": BRIDGE}), "\u2718 kernel: 5.4.0 is older than 5.7"),
        (("6.1.0", "proc /proc proc rw 0 0\n", {"10-bridge.conflist": BRIDGE}), "\u2718 eBPF"),
        (("6.1.0", BPF, {}), "\u2718 CNI: no CNI configuration"),
        (
            (
                "6.1.0",
                BPF,
                {
                    "10-bridge.conflist": {
                        **BRIDGE,
                        "plugins": [{"type": "bridge"}, {"type": "istio-cni"}],
                    }
                },
            ),
            "\u2718 conflict: 10-bridge.conflist chains Istio's istio-cni",
        ),
    ],
)
def test_precheck_reports_what_blocks_the_mesh(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    node: tuple[str, str, dict[str, object]],
    finding: str,
) -> None:
    """`node`: the fake node's kernel release, /proc/mounts and CNI conflists."""
    code, out, _ = precheck(capsys, fake_node(tmp_path, *node))
    assert code == 1
    assert finding in out


def test_precheck_warns_about_cilium(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cilium = {"cniVersion": "0.3.1", "name": "cilium", "plugins": [{"type": "cilium-cni"}]}
    root = fake_node(tmp_path, "6.1.0", BPF, {"05-cilium.conflist": cilium})
    code, out, _ = precheck(capsys, root)
    assert code == 0
    assert "! conflict: 05-cilium.conflist is Cilium's" in out


NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n"
SVC = """apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec: {clusterIP: 10.96.0.9, selector: {app: web}, ports: [{port: %d}]}
"""


def test_analyze_exit_code_is_istioctls_79(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.yaml").write_text(NS + "---\n" + SVC % 80)
    (tmp_path / "b.yaml").write_text(SVC % 81)
    code, out, _ = run(capsys, "analyze", str(tmp_path), "-o", "json")
    assert code == 79
    dup = [m for m in json.loads(out) if m["code"] == "AMB0107"]
    # The object is reported with the file the control plane keeps (the last one) and both
    # places are named.
    assert len(dup) == 1
    assert dup[0]["ref"] == "Service demo/web"
    assert dup[0]["origin"] == f"{tmp_path / 'b.yaml'}[0]"
    assert "a.yaml[1]" in dup[0]["message"]
    assert "b.yaml[0]" in dup[0]["message"]


def test_analyze_reports_istio_ingress_gateway(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "gw.yaml").write_text(
        NS
        + "---\napiVersion: networking.istio.io/v1\nkind: Gateway\n"
        + "metadata: {name: ingress, namespace: demo}\n"
        + "spec: {selector: {istio: ingressgateway}, servers: []}\n"
    )
    (tmp_path / "gwapi.yaml").write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
        "metadata: {name: public, namespace: demo}\n"
        "spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}\n"
    )
    code, out, _ = run(capsys, "analyze", str(tmp_path), "-o", "json")
    assert code == 79
    # Istio's and Gateway API's ingress Gateways: each said (kind not implemented, issue 10).
    assert [(m["code"], m["ref"]) for m in json.loads(out)] == [
        ("AMB0204", "Gateway demo/ingress"),
        ("AMB0204", "Gateway demo/public"),
    ]


def gateway(name: str, ns: str) -> str:
    return (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\n"
        "spec: {gatewayClassName: istio-waypoint, listeners: []}\n"
    )


def test_waypoint_list_honours_namespace_name_and_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "gws.yaml").write_text(
        "---\n".join(
            [gateway("waypoint", "default"), gateway("wp2", "default"), gateway("waypoint", "prod")]
        )
    )

    def listed(*extra: str) -> set[tuple[str, str]]:
        code, out, _ = run(capsys, "waypoint", "list", "-d", str(tmp_path), *extra)
        assert code == 0
        return {tuple(line.split()[:2]) for line in out.splitlines()[1:]}  # type: ignore[misc]

    assert listed() == {("default", "waypoint"), ("default", "wp2")}
    assert listed("-n", "prod") == {("prod", "waypoint")}
    assert listed("--name", "wp2") == {("default", "wp2")}
    assert listed("-A") == {("default", "waypoint"), ("default", "wp2"), ("prod", "waypoint")}
    code, out, _ = run(capsys, "waypoint", "list", "-d", str(tmp_path), "-n", "prod", "-o", "json")
    assert code == 0
    assert json.loads(out) == [
        {"name": "waypoint", "namespace": "prod", "for": "service", "file": "gws.yaml", "bound": []}
    ]


def test_waypoint_apply_to_a_missing_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "waypoint", "apply", "-d", str(tmp_path / "missing"))
    assert code == 1
    assert err == f"ambientctl: waypoint apply: {tmp_path / 'missing'}: not a directory\n"


def test_one_unreadable_file_does_not_block_waypoint_delete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "gw.yaml").write_text(gateway("waypoint", "default"))
    (tmp_path / "broken.yaml").write_text("kind: [unclosed\n")
    code, out, err = run(capsys, "waypoint", "delete", "-d", str(tmp_path))
    assert code == 0, err
    assert "waypoint default/waypoint deleted" in out
    assert "broken.yaml: cannot read" in err
    assert not (tmp_path / "gw.yaml").exists()
    assert (tmp_path / "broken.yaml").read_text() == "kind: [unclosed\n"  # left alone


def test_lab_subcommands_take_the_lab_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parser().parse_args(["lab", "exec", "--name", "other", "pod", "--", "true"])
    assert args.name == "other"
    assert args.pod == "pod"
    args = parser().parse_args(["lab", "--name", "first", "pods", "-n", "demo"])
    assert args.name == "first"
    assert args.namespace == "demo"
    code, _, err = run(
        capsys,
        "lab",
        "--state-root",
        str(tmp_path),
        "exec",
        "--name",
        "no-such-x",
        "p",
        "--",
        "true",
    )
    assert code != 0
    assert "no-such-x" in err
    assert len(err.strip().splitlines()) == 1


def test_analyze_namespace_filter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = SVC.replace("namespace: demo", "namespace: prod") % 80
    (tmp_path / "a.yaml").write_text(NS + "---\n" + SVC % 80 + "---\n" + other)
    (tmp_path / "b.yaml").write_text(SVC % 81 + "---\n" + other)
    code, out, _ = run(capsys, "analyze", str(tmp_path), "-o", "json", "-n", "prod")
    assert code == 79
    assert [m["ref"] for m in json.loads(out)] == ["Service prod/web"]
    code, out, _ = run(capsys, "analyze", str(tmp_path), "-o", "json", "-A")
    assert {m["ref"] for m in json.loads(out)} == {"Service prod/web", "Service demo/web"}
    code, out, _ = run(capsys, "analyze", str(tmp_path), "-o", "json", "-n", "nothing-here")
    assert code == 0
    assert json.loads(out) == []


def _leaves(
    p: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), p
        return
    seen: set[int] = set()
    for name, sp in subs[0].choices.items():
        if id(sp) not in seen:  # aliases (zc, ps, experimental) are the same parser
            seen.add(id(sp))
            yield from _leaves(sp, (*path, name))


def _documented(flag: str) -> set[str]:
    """The commands docs/istioctl.md's flag row names (backticked, before any "Not on")."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "istioctl.md").read_text()
    (row,) = [line for line in doc.splitlines() if line.startswith(f"| `{flag}` |")]
    notes = row.split(" | ")[2].split("Not on")[0]
    commands = {name for name, _ in _leaves(parser())}
    return {token for token in re.findall(r"`([^`]+)`", notes) if token in commands}


def test_flags_match_the_istioctl_table() -> None:
    """Every command with ``-o`` offers json and yaml (and istioctl's ``short`` where the output
    is rows), and docs/istioctl.md's ``-o``, ``-n`` and ``-A`` rows name exactly the commands
    that take them."""
    with_flag: dict[str, set[str]] = {"-o": set(), "-n": set(), "-A": set()}
    for name, p in _leaves(parser()):
        for action in p._actions:
            for flag in with_flag:
                if flag in action.option_strings:
                    with_flag[flag].add(name)
            if "-o" in action.option_strings:
                choices = set(action.choices or ())
                assert {"json", "yaml"} <= choices, name
                assert "short" in choices or name == "waypoint generate", name
    assert _documented("-o/--output") == with_flag["-o"]
    assert _documented("-n/--namespace") == with_flag["-n"]
    assert _documented("-A/--all-namespaces") == with_flag["-A"]


def test_analyze_output_log_is_istioctls_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.yaml").write_text(NS + "---\n" + SVC % 80 + "---\n" + SVC % 81)
    outs = set()
    for fmt in ((), ("-o", "log"), ("-o", "short"), ("-o", "text")):
        code, out, _ = run(capsys, "analyze", str(tmp_path), *fmt)
        assert code == 79
        outs.add(out)
    (text,) = outs
    assert "AMB0107" in text


def test_cluster_flags_on_a_command_without_a_cluster_are_said(
    dump: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "--context", "prod", "zc", "workloads", "--file", str(dump))
    assert code == 0
    assert err == "ambientctl: warning: --context not used: `zc` reads no cluster\n"


def test_waypoint_generate_and_status_as_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "waypoint", "generate", "-n", "prod", "-o", "json")
    assert code == 0
    assert json.loads(out)["metadata"] == {
        "name": "waypoint",
        "namespace": "prod",
        "labels": {"istio.io/waypoint-for": "service"},
    }
    (tmp_path / "gw.yaml").write_text(gateway("waypoint", "prod"))
    code, out, _ = run(
        capsys, "waypoint", "status", "-d", str(tmp_path), "-n", "prod", "-o", "yaml"
    )
    assert code == 0
    assert yaml.safe_load(out) == {
        "namespace": "prod",
        "name": "waypoint",
        "for": "service",
        "file": "gw.yaml",
    }
