"""The `ambientctl` entry point: --help on every command, shell completion exercised in a real
bash, `manifest generate` through the real helm, and `install` failing clearly without a
cluster (there is none here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ambientctl import completion
from ambientctl.main import main, parser

EXE = str(Path(sys.executable).with_name("ambientctl"))
REPO = Path(__file__).resolve().parents[2]


def command_paths() -> list[list[str]]:
    return [path.split() for path in completion.tree(parser())]


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "<top>")
def test_help_everywhere(path: list[str]) -> None:
    proc = subprocess.run([EXE, *path, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ambientctl")
    assert proc.stderr == ""


def test_every_issue_command_is_registered() -> None:
    top = completion.tree(parser())[""]
    for cmd in (
        "install",
        "manifest",
        "analyze",
        "ztunnel-config",
        "proxy-status",
        "completion",
        "lab",
    ):
        assert cmd in top
    assert completion.tree(parser())["ztunnel-config"][-6:] == [
        "all",
        "certificates",
        "connections",
        "policies",
        "services",
        "workloads",
    ]


def complete(script: str, words: list[str]) -> list[str]:
    """What bash offers for `words` (the last one is the word being completed)."""
    quoted = " ".join(f"'{w}'" for w in words)
    prog = f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _ambientctl\n"
    prog += 'printf "%s\\n" "${COMPREPLY[@]}"\n'
    proc = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert complete(script, ["ambientctl", "ztu"]) == ["ztunnel-config"]
    assert complete(script, ["ambientctl", "ztunnel-config", "c"]) == [
        "certificates",
        "connections",
    ]
    assert complete(script, ["ambientctl", "zc", "all", "-o", ""]) == [
        "table",
        "short",
        "json",
        "yaml",
    ]
    assert complete(script, ["ambientctl", "lab", "--name", "x", "d"]) == ["demo", "down"]
    assert "--failure-threshold" in complete(script, ["ambientctl", "analyze", "--f"])
    assert complete(script, ["ambientctl", "manifest", ""])[-1] == "generate"
    assert main(["completion", "zsh"]) == 0
    assert capsys.readouterr().out.startswith("autoload -U +X bashcompinit")


def have_helm() -> bool:
    candidates = (
        os.environ.get("AMBIENT_HELM"),
        str(REPO / ".tools/node_modules/.bin/helm"),
        shutil.which("helm"),
    )
    return any(c and os.access(c, os.X_OK) for c in candidates)


@pytest.mark.skipif(not have_helm() and not os.environ.get("CI"), reason="helm not installed")
def test_manifest_generate_renders_the_chart(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "manifest",
                "generate",
                "-n",
                "mesh",
                "--set",
                "cni.enabled=false",
                "--set",
                "node.agent.enrolledNamespaces={demo}",
            ]
        )
        == 0
    )
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    ds = by_kind[("DaemonSet", "ztunnel")]
    assert ds["metadata"]["namespace"] == "mesh"
    names = [c["name"] for c in ds["spec"]["template"]["spec"]["containers"]]
    assert names == ["ztunnel", "agent"]  # cni.enabled=false honoured
    assert (
        "istio.io/dataplane-mode: ambient"
        in by_kind[("ConfigMap", "ambient-enrollment")]["data"]["namespaces.yaml"]
    )
    assert ("CustomResourceDefinition", "authorizationpolicies.security.istio.io") in by_kind


@pytest.mark.skipif(not have_helm() and not os.environ.get("CI"), reason="helm not installed")
def test_manifest_generate_errors_are_helms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["manifest", "generate", "--set", "node.agent.uplink=a/b"]) == 1
    err = capsys.readouterr().err
    assert "helm template failed" in err
    assert "node.agent.uplink" in err
    assert main(["manifest", "generate", "--set", "novalue"]) == 1
    assert "expected key=value" in capsys.readouterr().err
    assert main(["manifest", "generate", "-f", str(tmp_path / "none.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["manifest", "generate", "--chart", str(tmp_path)]) == 1
    assert "not a chart" in capsys.readouterr().err


def test_install_without_a_cluster_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "kubeconfig").write_text("apiVersion: v1\nkind: Config\nclusters: []\n")
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "kubeconfig")}
    proc = subprocess.run([EXE, "install"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 5, proc.stderr
    assert "no Kubernetes cluster configured" in proc.stderr
    assert "ambientctl manifest generate" in proc.stderr
    assert "Traceback" not in proc.stderr
