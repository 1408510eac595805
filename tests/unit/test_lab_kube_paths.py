"""The kube lab refuses a repository or virtualenv its pods' mounts would hide (a venv under
/tmp, where the chart's pods mount an emptyDir: their exec failed with ENOENT), before it builds
anything; the lab kubelet refuses such a container with the same reason (pure checks, the real
chart's templates)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, cast

import pytest

from ambientctl.errors import LabCommandError
from ambientctl.lab import container, kubelab, topology
from ambientctl.lab.kubelet import KubeletSettings, LabKubelet, RunningPod


def test_the_chart_mounts_over_tmp() -> None:
    points = kubelab.chart_mount_points()
    assert Path("/tmp") in points
    assert Path("/etc/ambient/controlplane-roots") in points
    assert all(p.is_absolute() and "{" not in str(p) for p in points)


@pytest.mark.parametrize(
    "needed",
    [
        {"virtualenv": Path("/tmp/ambient-mesh/.venv")},
        {"repository": Path("/tmp/ambient-mesh")},
        {"interpreter": Path("/tmp/venv/bin/python")},
        {"repository": Path("/tmp")},
    ],
)
def test_a_tree_under_tmp_is_refused_with_the_reason(needed: dict[str, Path]) -> None:
    ((what, path),) = needed.items()
    with pytest.raises(LabCommandError) as refused:
        kubelab.check_paths(needed)
    message = str(refused.value)
    assert f"the {what} {path} is under /tmp" in message
    assert "chart's pods mount over" in message
    assert "move the repository" in message


def test_a_tree_elsewhere_is_accepted() -> None:
    kubelab.check_paths({"repository": Path("/work/ambient-mesh"), "venv": Path("/tmpfoo/v")})
    kubelab.check_paths()  # this checkout, as the lab tests run it


def test_a_symbolic_link_into_a_mount_point_is_hidden_too(tmp_path: Path) -> None:
    mount = tmp_path / "mnt"
    (mount / "venv").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    link = tmp_path / "elsewhere" / "venv"
    link.symlink_to(mount / "venv")
    assert container.hidden({"virtualenv": link}, [mount]) == (
        f"the virtualenv {link} is under {mount}"
    )
    assert container.hidden({"virtualenv": tmp_path / "elsewhere"}, [mount]) is None
    assert container.hidden({"virtualenv": tmp_path / "mnt2" / "v"}, [mount]) is None


def test_the_kubelet_refuses_a_container_that_mounts_over_its_interpreter(tmp_path: Path) -> None:
    """Any pod, not only the chart's: a container with a volume at /tmp, run by an interpreter
    under /tmp, fails to start with that reason (the pod's failure and log line), instead of
    an exec failing with ENOENT inside the container."""
    settings = KubeletSettings(
        lab="lab",
        conflist={},
        cni_path=[],
        root=tmp_path,
        path_env="/usr/bin:/bin",
        bind_mounts=True,
        python="/tmp/venv/bin/python",
    )
    kubelet = LabKubelet(
        api=cast(Any, None), node=topology.node_plan("lab", "node-1", 1), settings=settings
    )
    rp = RunningPod(
        uid="u1",
        namespace="ns",
        name="p",
        netns="lab-ns-p",
        ip="10.0.0.5",
        dir=tmp_path,
        started=dt.datetime.now(dt.UTC),
    )
    app = {
        "name": "app",
        "command": ["ztunnel"],
        "volumeMounts": [{"name": "t", "mountPath": "/tmp"}],
    }
    with pytest.raises(LabCommandError, match=r"container app: the interpreter .* under /tmp"):
        kubelet._launch(app, rp, {}, {"t": tmp_path / "empty"})
    elsewhere = {**app, "volumeMounts": [{"name": "t", "mountPath": "/data"}]}
    argv, _ = kubelet._launch(elsewhere, rp, {}, {"t": tmp_path / "empty"})
    assert argv[-1] == "ztunnel"
