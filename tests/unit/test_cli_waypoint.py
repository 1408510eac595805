"""`ambientctl waypoint`: generate, apply/list/delete on a manifest directory (what the control
plane then translates), --help everywhere, helpful errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ambientctl.main import main
from controlplane.sources.files import ManifestDirectory
from controlplane.store import ConfigStore
from controlplane.translate import TranslateOptions
from controlplane.translator import Translator
from meshcore.model import Service

BASE = """
apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  clusterIP: 10.96.0.20
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: 9080}]
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def translated(directory: Path) -> dict[str, Service]:
    store = ConfigStore()
    ManifestDirectory(directory, store).scan()
    t = Translator(TranslateOptions())
    t.update(store.snapshot)
    return {r.key: r for r in t.records() if isinstance(r, Service)}


def test_generate_prints_a_waypoint_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "waypoint", "generate", "--name", "wp", "-n", "shop", "--for", "all")
    assert code == 0
    doc = yaml.safe_load(out)
    assert doc["kind"] == "Gateway"
    assert doc["spec"]["gatewayClassName"] == "istio-waypoint"
    assert doc["metadata"] == {
        "name": "wp",
        "namespace": "shop",
        "labels": {"istio.io/waypoint-for": "all"},
    }
    assert doc["spec"]["listeners"] == [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
    code, out, _ = run(capsys, "waypoint", "generate", "--service-account", "reviews")
    assert yaml.safe_load(out)["metadata"]["labels"]["istio.io/waypoint-for"] == "workload"


def test_apply_enroll_list_delete_round_trip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "base.yaml").write_text(BASE)
    key = "default/reviews.default.svc.cluster.local"
    assert translated(tmp_path)[key].waypoint is None
    code, out, _ = run(capsys, "waypoint", "apply", "-d", str(tmp_path), "--enroll-namespace")
    assert code == 0
    assert "labeled" in out
    assert (tmp_path / "waypoint-default-waypoint.yaml").exists()
    ns = next(
        d
        for d in yaml.safe_load_all((tmp_path / "base.yaml").read_text())
        if d["kind"] == "Namespace"
    )
    assert ns["metadata"]["labels"] == {
        "istio.io/dataplane-mode": "ambient",
        "istio.io/use-waypoint": "waypoint",
    }
    svcs = translated(tmp_path)
    wp = svcs[key].waypoint
    assert wp is not None
    assert wp.hostname is not None
    assert wp.hostname.key == "default/waypoint.default.svc.cluster.local"
    assert "default/waypoint.default.svc.cluster.local" in svcs
    code, out, _ = run(capsys, "waypoint", "list", "-d", str(tmp_path))
    assert code == 0
    assert out.splitlines()[1].split() == ["default", "waypoint", "service", "Namespace/default"]
    code, out, _ = run(capsys, "waypoint", "status", "-d", str(tmp_path))
    assert code == 0
    assert "for service" in out
    code, out, _ = run(capsys, "waypoint", "delete", "-d", str(tmp_path))
    assert code == 0
    assert "deleted" in out
    assert not (tmp_path / "waypoint-default-waypoint.yaml").exists()
    svcs = translated(tmp_path)
    assert svcs[key].waypoint is None
    assert "default/waypoint.default.svc.cluster.local" not in svcs
    code, _, err = run(capsys, "waypoint", "delete", "-d", str(tmp_path))
    assert code == 1
    assert "no waypoint default/waypoint" in err


def test_service_account_waypoint_binds_the_service_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _out, _ = run(
        capsys,
        "waypoint",
        "apply",
        "-d",
        str(tmp_path),
        "--name",
        "rv-wp",
        "--service-account",
        "reviews",
    )
    assert code == 0
    sa = yaml.safe_load((tmp_path / "serviceaccount-default-reviews.yaml").read_text())
    assert sa["kind"] == "ServiceAccount"
    assert sa["metadata"]["labels"] == {"istio.io/use-waypoint": "rv-wp"}
    gw = yaml.safe_load((tmp_path / "waypoint-default-rv-wp.yaml").read_text())
    assert gw["metadata"]["labels"]["istio.io/waypoint-for"] == "workload"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["waypoint", "apply"], "give -d DIR"),
        (["waypoint", "list", "-d", "/nonexistent-dir-xyz"], "not a directory"),
        (
            ["waypoint", "apply", "-d", ".", "--for", "workload", "--enroll-namespace"],
            "needs --for service",
        ),
        (["waypoint", "status", "--lab", "no-such-lab-x"], "no lab"),
    ],
)
def test_helpful_errors(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code != 0
    assert message in err


@pytest.mark.parametrize("sub", ["", "generate", "apply", "list", "delete", "status"])
def test_help_everywhere(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["waypoint", *([sub] if sub else []), "--help"])
    assert exc.value.code == 0
    assert "usage: ambientctl waypoint" in capsys.readouterr().out
