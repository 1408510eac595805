"""The chart and the binaries agree: the node DaemonSet rendered by the real helm runs in a lab
node, as a kubelet would run it.

A lab (examples/lab: two nodes, control plane, eBPF capture) is brought up; node-2's own node
proxy and node agent are stopped and replaced by the DaemonSet's three containers, started
from the RENDERED manifest:
- command/args with the kubelet's $(VAR) expansion of the rendered env (fieldRefs resolved
  to node-2's name/IP and the release namespace);
- volumeMounts resolved to host paths (hostPath volumes as rendered; the Secret and ConfigMap
  volumes materialised from the lab's CA roots, node-2's token and the lab's manifests);
- exactly the rendered capabilities (setpriv bounding set, no_new_privs), in node-2's netns
  (hostNetwork).
Then: the node proxy becomes ready on the rendered readiness probe (config over xDS and
certificates from the lab's control plane over TLS, with the rendered flags), the agent
answers on the rendered socket and keeps node-2's pods enrolled, traffic from node-1 to the
echo pod on node-2 crosses the chart-started node proxy with mTLS identities, install-cni
copies the plugin and chains it into the conflist; finally the uninstall path: with the
DaemonSet still present (rolling update) install-cni keeps the CNI entry, with it deleted
(API answers 404) it and the agent's preStop hook remove the CNI entry, the plugin and the
node's capture.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from ambientctl.lab import system
from ambientctl.lab.lab import XDS_ADDRESS, Lab
from ambientctl.lab.podspec import expand, map_paths, resolve_env
from cni import protocol
from cni.install import write_launcher
from tests.root.labfixture import ECHO, SLEEP, call, manifests

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ambient"
VENV_BIN = Path(sys.executable).parent
NAMESPACE = "istio-system"
NODE = "node-2"


def helm() -> str:
    for c in (os.environ.get("AMBIENT_HELM"), str(REPO / ".tools/node_modules/.bin/helm")):
        if c and os.access(c, os.X_OK):
            return c
    found = shutil.which("helm")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("helm missing in CI (scripts/setup installs it)")
    pytest.skip("helm not installed")


def render_daemonset(sets: list[str]) -> dict[str, Any]:
    argv = [
        helm(),
        "template",
        "ambient",
        str(CHART),
        "-n",
        NAMESPACE,
        "--kube-version",
        "1.33.0",
        "--show-only",
        "templates/node-daemonset.yaml",
    ]
    for s in sets:
        argv += ["--set", s]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ds: dict[str, Any] = yaml.safe_load(proc.stdout)
    assert ds["kind"] == "DaemonSet"
    return ds


# ------------------------------------------------ a tiny kubelet (env, $(VAR), paths: the lab's)


def mount_map(
    pod: Mapping[str, Any], container: Mapping[str, Any], materialised: Mapping[str, Path]
) -> dict[str, Path]:
    """container mountPath -> host path (hostPath volumes as rendered; others materialised)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    out = {}
    for m in container.get("volumeMounts", []):
        vol = volumes[m["name"]]
        if "hostPath" in vol:
            out[m["mountPath"]] = materialised.get(m["name"], Path(vol["hostPath"]["path"]))
        else:
            out[m["mountPath"]] = materialised[m["name"]]
    return out


def capabilities(container: Mapping[str, Any]) -> str:
    caps = container["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    return ",".join(["-all", *(f"+{c.lower()}" for c in caps.get("add", []))])


Argv = list[str]


def container_argv(
    pod: Mapping[str, Any], name: str, fields: Mapping[str, str], materialised: Mapping[str, Path]
) -> tuple[Argv, dict[str, str]]:
    c = next(c for c in pod["containers"] if c["name"] == name)
    env = resolve_env(c, fields)
    mounts = mount_map(pod, c, materialised)
    argv = [map_paths(expand(a, env), mounts) for a in [*c["command"], *c.get("args", [])]]
    env = {k: map_paths(v, mounts) for k, v in env.items()}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert not sc.get("privileged")
    limited = [
        "setpriv",
        f"--bounding-set={capabilities(c)}",
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
        *argv,
    ]
    return limited, env


def base_env(extra: Mapping[str, str]) -> dict[str, str]:
    path = f"{REPO / 'images' / 'node'}:{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"
    return {"PATH": path, "HOME": "/root", **extra}


@contextlib.contextmanager
def api_standin(deleted: dict[str, bool], netns: str = "") -> Iterator[str]:
    """The DaemonSet as the API server shows it: 200 while it exists, 404 once deleted.
    Listens on 127.0.0.1 of `netns` (default: ours)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != f"/apis/apps/v1/namespaces/{NAMESPACE}/daemonsets/ztunnel":
                self.send_error(403)
                return
            if deleted["value"]:
                self.send_error(404)
                return
            body = json.dumps({"kind": "DaemonSet", "metadata": {"name": "ztunnel"}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    if netns:
        from ebpf.netns import entered

        with entered(netns):  # the listening socket belongs to the netns it was made in
            server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    else:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


Procs = Mapping[str, subprocess.Popen[bytes]]


def wait_for(
    pred: Any,
    what: str,
    timeout: float = 60,
    procs: Procs | None = None,
    logs: Mapping[str, Path] | None = None,
) -> None:
    procs, logs = procs or {}, logs or {}
    deadline = time.monotonic() + timeout
    while not pred():
        for name, p in procs.items():
            if p.poll() is not None:
                raise AssertionError(
                    f"{name} exited {p.returncode}:\n{logs[name].read_text()[-4000:]}"
                )
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {n}\n{logs[n].read_text()[-2000:]}" for n in logs)
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_rendered_daemonset_runs_in_a_lab_node(tmp_path: Path) -> None:
    helm()
    lab = Lab("chartds", state_root=tmp_path / "state", log=print)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    cleanup: list[Path] = []
    try:
        lab.up(manifests(tmp_path))
        st = lab.state
        assert st is not None
        node = st.node(NODE)
        plan = node.plan
        # node-2's "host filesystem" for the DaemonSet. Not under /tmp: the containers mount
        # an emptyDir at /tmp, and host paths in env values (AGENT_SOCKET) must not look like it.
        host = Path(tempfile.mkdtemp(prefix="ambient-chart-", dir="/var/tmp"))
        cleanup.append(host)
        sock_dir, bin_dir, conf_dir = host / "run-ambient", host / "cni-bin", host / "cni-conf"
        for d in (sock_dir, bin_dir, conf_dir):
            d.mkdir(parents=True)
        ds = render_daemonset(
            [
                f"node.xdsAddress={XDS_ADDRESS}",
                f"cni.socketDir={sock_dir}",
                f"cni.binDir={bin_dir}",
                f"cni.confDir={conf_dir}",
                "cni.recheckSeconds=1",
                f"node.agent.bpffsDir=/sys/fs/bpf/{NODE}",
                "node.agent.uplink=eth0",
                "node.drainTimeoutSeconds=1",
                # The lab has no API server: its control plane authenticates node proxies by node
                # tokens and the agent reads labels from manifests (cluster defaults: TokenReview,
                # labels from the API; those are tested against the API stand-in).
                "auth.mode=nodeCredentials",
                "node.agent.labelsFrom=configMap",
                f"node.handoverDir={host / 'handover'}",
            ]
        )
        pod = ds["spec"]["template"]["spec"]
        assert pod["hostNetwork"] is True

        # What the kubelet would mount: the Secrets/ConfigMap, and the bpffs (the lab's).
        roots, tokens, tmp = host / "roots", host / "tokens", host / "tmp"
        for d in (roots, tokens, tmp):
            d.mkdir()
        shutil.copy(lab.paths.roots, roots / "root-cert.pem")
        shutil.copy(lab.paths.node_token(NODE), tokens / NODE)
        materialised = {
            "controlplane-roots": roots,
            "node-credentials": tokens,
            "enrollment": lab.paths.manifests,
            "bpffs": lab.paths.bpffs,
            "tmp": tmp,
        }
        fields = {"spec.nodeName": NODE, "status.hostIP": plan.ip, "metadata.namespace": NAMESPACE}

        # The node's state survives a DaemonSet pod restart on the host (hostPath): carry the
        # lab agent's registry over, as the previous agent pod would have left it.
        shutil.copytree(lab.paths.node_dir(NODE) / "agent", sock_dir / "agent")
        # The node's conflist as the primary CNI wrote it (without us): install-cni chains it.
        conflist = json.loads(lab.paths.conflist(NODE).read_text())
        conflist["plugins"] = [p for p in conflist["plugins"] if p["type"] != "ambient-cni"]
        (conf_dir / "10-lab.conflist").write_text(json.dumps(conflist, indent=2))
        # The image's self-contained plugin build is stood in for by the launcher of this tree.
        plugin_src = write_launcher(host, sys.executable)

        # Replace node-2's own node proxy and agent by the DaemonSet's containers.
        system.stop(node.ztunnel_pid)
        system.stop(node.agent_pid)

        def start(name: str, *, netns: bool = True, extra_env: Mapping[str, str] = {}) -> None:
            argv, env = container_argv(pod, name, fields, materialised)
            if netns:
                argv = system.nsenter(plan.netns, argv)
            logs[name] = host / f"{name}.log"
            with open(logs[name], "wb") as out:
                procs[name] = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=base_env({**env, **extra_env}),
                )

        start("agent")
        agent_sock = sock_dir / "cni.sock"
        wait_for(lambda: agent_sock.exists(), "agent socket", procs=procs, logs=logs)
        start("ztunnel")
        # The rendered exec probe (a pod-local file: 15021 is shared with a predecessor pod
        # in the host network until the hand-over completes), with the pod's mounts mapped.
        zt = next(c for c in pod["containers"] if c["name"] == "ztunnel")
        zt_mounts = mount_map(pod, zt, materialised)
        probe = [map_paths(a, zt_mounts) for a in zt["readinessProbe"]["exec"]["command"]]
        wait_for(
            lambda: subprocess.run(probe, check=False).returncode == 0,
            "rendered readiness probe",
            procs=procs,
            logs=logs,
        )
        assert system.http_ok(plan.netns, f"http://{plan.ip}:15021/healthz/ready")

        # The agent: answers on the rendered socket and keeps node-2's ambient pod enrolled.
        status = protocol.call(str(agent_sock), {"op": "status"}, timeout=10)
        states = {f"{p['namespace']}/{p['name']}": p["redirection"] for p in status["pods"]}
        assert states["demo/echo"] == "enabled", states

        # The node proxy: config over xDS and certificates from the lab's control plane.
        dump = json.loads(system.http_get(plan.netns, "http://127.0.0.1:15000/config_dump")[1])
        assert dump["node"] == NODE
        assert {w["name"] for w in dump["workloads"]} >= {"client", "echo"}
        assert [c["identity"] for c in dump["certificates"] if c["state"] == "available"]

        # Traffic: client (node-1) -> echo service -> echo pod on node-2, through the
        # chart-started node proxy, with mTLS identities in its access log.
        client_ip = lab.pod("demo/client").ip
        rc, out = call(lab, "demo/client", "echo", 80, "via the chart")
        assert rc == 0, out
        assert f"you are {client_ip}:" in out, out
        wait_for(
            lambda: SLEEP in logs["ztunnel"].read_text(),
            "access log",
            timeout=10,
            procs=procs,
            logs=logs,
        )
        lines = logs["ztunnel"].read_text().splitlines()
        inbound = [
            json.loads(line[line.index("{") :])
            for line in lines
            if "ztunnel.access" in line and "{" in line
        ]
        assert any(a["src.identity"] == SLEEP and a["dst.identity"] == ECHO for a in inbound)

        # install-cni: plugin copied, ambient-cni chained last with the rendered socket.
        deleted = {"value": False}
        with api_standin(deleted) as api:
            extra = {
                "CNI_PLUGIN_SRC": str(plugin_src),
                "READY_FILE": str(tmp / "cni-installed"),
                "AMBIENT_API_SERVER": api,
            }
            start("install-cni", netns=False, extra_env=extra)  # it only touches files
            wait_for(
                lambda: (tmp / "cni-installed").exists(),
                "install-cni ready",
                procs=procs,
                logs=logs,
            )
            chained = json.loads((conf_dir / "10-lab.conflist").read_text())
            assert chained["plugins"][-1] == {
                "type": "ambient-cni",
                "agentSocket": str(agent_sock),
                "agentTimeout": 5.0,
            }
            assert chained["plugins"][:-1] == conflist["plugins"]
            plugin = bin_dir / "ambient-cni"
            assert os.access(plugin, os.X_OK)
            assert plugin.read_bytes() == plugin_src.read_bytes()
            version = subprocess.run(
                [str(plugin)],
                input=b'{"cniVersion": "1.0.0"}',
                env={"CNI_COMMAND": "VERSION", "PATH": os.environ["PATH"]},
                capture_output=True,
                timeout=30,
            )
            assert version.returncode == 0
            assert "1.0.0" in version.stdout.decode()
            # The primary CNI rewrites its conflist: we are chained again within a re-check.
            (conf_dir / "10-lab.conflist").write_text(json.dumps(conflist))
            wait_for(
                lambda: "ambient-cni" in (conf_dir / "10-lab.conflist").read_text(),
                "re-chain",
                timeout=10,
                procs=procs,
                logs=logs,
            )

            # Rolling update (the DaemonSet still exists): the entry and the plugin stay.
            stop(procs.pop("install-cni"))
            assert "ambient-cni" in (conf_dir / "10-lab.conflist").read_text()
            assert plugin.exists()
            # Uninstall (the DaemonSet is gone): both removed, the conflist as it was.
            start("install-cni", netns=False, extra_env=extra)
            wait_for(
                lambda: (tmp / "cni-installed").exists(),
                "install-cni ready again",
                procs=procs,
                logs=logs,
            )
            deleted["value"] = True
            stop(procs.pop("install-cni"))
            assert json.loads((conf_dir / "10-lab.conflist").read_text()) == conflist
            assert not plugin.exists()

        # The agent's preStop hook, rendered: keeps the node's capture while the DaemonSet
        # exists, removes it once it is deleted. The agent runs in the node's (host) netns,
        # so the API stand-in listens there.
        agent = next(c for c in pod["containers"] if c["name"] == "agent")
        hook = agent["lifecycle"]["preStop"]["exec"]["command"]
        mounts = mount_map(pod, agent, materialised)
        hook = [
            "setpriv",
            f"--bounding-set={capabilities(agent)}",
            "--inh-caps=-all",
            "--no-new-privs",
            "--",
            *(map_paths(h, mounts) for h in hook),
        ]
        pins = lab.paths.bpf_dir(NODE)
        assert any(pins.iterdir()), "capture pins expected before the hook"
        deleted = {"value": False}
        with api_standin(deleted, plan.netns) as api:
            env = base_env({**resolve_env(agent, fields), "AMBIENT_API_SERVER": api})
            proc = subprocess.run(
                system.nsenter(plan.netns, hook), env=env, capture_output=True, timeout=60
            )
            assert proc.returncode == 0, proc.stderr.decode()
            assert any(pins.iterdir()), "a rolling update must keep capture"
            deleted["value"] = True
            proc = subprocess.run(
                system.nsenter(plan.netns, hook), env=env, capture_output=True, timeout=60
            )
            assert proc.returncode == 0, proc.stderr.decode()
            assert not pins.exists() or not any(pins.iterdir()), list(pins.iterdir())
            tc = system.run(
                system.nsenter(plan.netns, ["tc", "filter", "show", "dev", "eth0", "ingress"])
            )
            assert "ambient" not in tc
    finally:
        for p in procs.values():
            stop(p)
        lab.down()
        for d in cleanup:
            shutil.rmtree(d, ignore_errors=True)
