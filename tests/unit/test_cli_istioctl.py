"""`ambientctl` as istioctl users type it (issue 12): plural section names, ``-o short``,
``-n``/``-A``, ``--context``/``--kubeconfig`` anywhere, ``version``, ``x precheck``, istioctl's
analyze exit code, and each CLI defect the issue lists: a clear one-line error and a non-zero
exit, never a traceback."""

from __future__ import annotations

import json
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
    assert "No issues found" in err


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
    code, out, _ = run(capsys, "analyze", str(tmp_path), "-o", "json")
    assert code == 79
    assert [m["code"] for m in json.loads(out)] == ["AMB0204"]  # kind not implemented (issue 10)


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
