"""A real Kubernetes control plane on this machine: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler, built from source by ``scripts/kube-build`` (docs/kube.md).

Owns: the cluster's PKI (a CA, the API server's serving certificate, client certificates whose
CN/O are the Kubernetes user/groups, the service-account signing key), the processes' flags,
their bounded start and stop, and the admin kubeconfig.

- Authentication is real: x509 client certificates (admin is ``system:masters``; the controller
  manager and scheduler use their bootstrap RBAC users; a lab node gets ``system:node:<name>`` in
  ``system:nodes``), and service-account tokens signed with the generated key under a fixed issuer,
  so the TokenRequest API issues projected tokens that TokenReview authenticates.
- Authorization is ``Node,RBAC``; admission is the API server's default plugin set plus
  ``NodeRestriction``.
- Everything listens on one given address only (loopback by default, or the lab underlay);
  etcd listens on 127.0.0.1 only, plain HTTP: only the API server talks to it.
- ``stop()`` stops every process it started (by pid: each runs in its own session) with a bounded
  wait, then removes the cluster's directory; it is idempotent and safe after a partial start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ambientctl.errors import LabCommandError
from ambientctl.lab import system
from ebpf.netns import entered

_T = TypeVar("_T")

KUBE_VERSION = "v1.37.2"  # scripts/kube-build and tools/kube/go.mod pin the same release
SERVICE_CIDR = "10.96.0.0/16"  # the lab manifests' ClusterIPs are in it
CLUSTER_DOMAIN = "cluster.local"
SA_ISSUER = f"https://kubernetes.default.svc.{CLUSTER_DOMAIN}"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")


def bin_dir() -> Path:
    """Where scripts/kube-build puts the binaries (``AMBIENT_KUBE_BIN`` overrides)."""
    env = os.environ.get("AMBIENT_KUBE_BIN")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ambient-mesh" / "kube" / KUBE_VERSION / "bin"


def require_binaries(directory: Path | None = None) -> Path:
    """The bin directory, or LabCommandError naming the build command when a binary is missing."""
    d = directory or bin_dir()
    missing = [b for b in BINARIES if not os.access(d / b, os.X_OK)]
    if missing:
        raise LabCommandError(
            f"Kubernetes binaries missing in {d}: {', '.join(missing)}; "
            "build them with ./scripts/kube-build (docs/kube.md)"
        )
    return d


# -- PKI ----------------------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    key_cert_sign=True,
    crl_sign=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Credential:
    """A PEM certificate and key on disk."""

    cert: Path
    key: Path


class KubePki:
    """The cluster CA (ECDSA P-256, one day) and what it issues, written under ``directory``."""

    def __init__(self, directory: Path, *, lifetime: dt.timedelta = dt.timedelta(days=1)) -> None:
        self.directory = directory
        self.lifetime = lifetime
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ambient-lab-kubernetes-ca")])
        now = _now()
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca = self._write("ca", self._cert, self._key)
        # The service-account signing key (RS256: the API server's default algorithm).
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_key = directory / "sa.key"
        self.sa_pub = directory / "sa.pub"
        self._write_file(self.sa_key, _pem_key(sa), 0o600)
        pub = sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._write_file(self.sa_pub, pub, 0o644)

    @property
    def ca_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def _write_file(self, path: Path, data: bytes, mode: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def _write(
        self, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> Credential:
        c = Credential(cert=self.directory / f"{name}.crt", key=self.directory / f"{name}.key")
        self._write_file(c.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        self._write_file(c.key, _pem_key(key), 0o600)
        return c

    def issue(
        self, name: str, *, common_name: str, organizations: tuple[str, ...] = ()
    ) -> Credential:
        """A client certificate: CN = user, O = groups (Kubernetes x509 client authentication)."""
        return self._leaf(name, common_name, organizations, sans=None)

    def issue_server(
        self, name: str, *, common_name: str, dns: tuple[str, ...] = (), ips: tuple[str, ...] = ()
    ) -> Credential:
        """A serving certificate for the given DNS names and IPs."""
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        return self._leaf(name, common_name, (), sans=sans)

    def _leaf(
        self,
        name: str,
        common_name: str,
        organizations: tuple[str, ...],
        sans: list[x509.GeneralName] | None,
    ) -> Credential:
        """Signed by this CA; `sans` None: a client certificate, else a serving one."""
        server = sans is not None
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + self.lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return self._write(name, builder.sign(self._key, hashes.SHA256()), key)


def kubeconfig(path: Path, *, server: str, ca: Path, user: Credential, name: str) -> Path:
    """A kubeconfig file (JSON is YAML) with files referenced by absolute path."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [
            {
                "name": name,
                "user": {"client-certificate": str(user.cert), "client-key": str(user.key)},
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }
    path.write_text(json.dumps(doc, indent=1))
    path.chmod(0o600)
    return path


def free_port(address: str) -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


# -- the cluster --------------------------------------------------------------------------------


@dataclass(slots=True)
class KubeCluster:
    """One control plane under ``root`` (created; removed by `stop`)."""

    root: Path
    address: str = "127.0.0.1"
    bin: Path = field(default_factory=bin_dir)
    api_port: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    argv: dict[str, list[str]] = field(default_factory=dict)
    pki: KubePki | None = None
    netns: str | None = None
    """Run every component in this network namespace (the lab underlay); `request`, `kubectl`
    and `in_netns` reach the API server from there."""

    @property
    def server(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"https://{host}:{self.api_port}"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.root / "admin.kubeconfig"

    def log(self, component: str) -> Path:
        return self.root / "logs" / f"{component}.log"

    def start(self, *, timeout: float = 120.0) -> None:
        """etcd, then the API server (until /readyz), then controller-manager and scheduler.
        On failure everything started is stopped and LabCommandError carries the log tail."""
        require_binaries(self.bin)
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        pki = self.pki = KubePki(self.root / "pki")
        # A fresh lab netns has every port free: the API server's usual one.
        self.api_port = self.api_port or (6443 if self.netns else free_port(self.address))
        etcd_client, etcd_peer = free_port("127.0.0.1"), free_port("127.0.0.1")
        self._spawn(
            "etcd",
            [
                str(self.bin / "etcd"),
                "--name=lab",
                f"--data-dir={self.root / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_client}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_client}",
                f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
                f"--initial-cluster=lab=http://127.0.0.1:{etcd_peer}",
                "--log-level=warn",
                "--quota-backend-bytes=1073741824",
            ],
        )
        serving = pki.issue_server(
            "apiserver",
            common_name="kube-apiserver",
            dns=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                f"kubernetes.default.svc.{CLUSTER_DOMAIN}",
            ),
            ips=tuple({self.address, "127.0.0.1", "10.96.0.1"}),
        )
        admin = pki.issue("admin", common_name="lab-admin", organizations=("system:masters",))
        kubeconfig(
            self.admin_kubeconfig,
            server=self.server,
            ca=pki.ca.cert,
            user=admin,
            name="ambient-lab",
        )
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_client}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.root / 'apiserver'}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={pki.ca.cert}",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                # A loopback address cannot be a Service endpoint: the API server must not
                # publish itself as the `kubernetes` Service's endpoint there. On the lab
                # underlay it does (the default lease reconciler), so in-cluster clients
                # reach it at 10.96.0.1:443 through the lab kube-proxy.
                *(
                    ["--endpoint-reconciler-type=none"]
                    if ipaddress.ip_address(self.address).is_loopback
                    else []
                ),
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait_ready("kube-apiserver", "/readyz", deadline)
        for component, user in (
            ("kube-controller-manager", "system:kube-controller-manager"),
            ("kube-scheduler", "system:kube-scheduler"),
        ):
            cred = pki.issue(component, common_name=user)
            kc = kubeconfig(
                self.root / f"{component}.kubeconfig",
                server=self.server,
                ca=pki.ca.cert,
                user=cred,
                name="ambient-lab",
            )
            argv = [
                str(self.bin / component),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port('127.0.0.1')}",
                f"--cert-dir={self.root / component}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ]
            if component == "kube-controller-manager":
                argv += [
                    f"--service-account-private-key-file={pki.sa_key}",
                    f"--root-ca-file={pki.ca.cert}",
                    "--use-service-account-credentials=true",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                ]
            self._spawn(component, argv)
        # Both report health on their own ports; waiting for the API server's view is enough:
        # the controller-manager's service-account controller creates `default` in `default`.
        while not self._exists("/api/v1/namespaces/default/serviceaccounts/default"):
            self._check_alive(deadline, "the controller-manager's default ServiceAccount")
            time.sleep(0.2)

    def _spawn(self, component: str, argv: list[str]) -> None:
        self.argv[component] = argv
        self.pids[component] = system.spawn(
            self.in_netns(argv), log=self.log(component), cwd=self.root
        )

    def in_netns(self, argv: list[str]) -> list[str]:
        """``argv`` run where the cluster's network is (for kubectl, helm)."""
        return system.nsenter(self.netns, argv) if self.netns else argv

    def restart_apiserver(self, *, down: float = 0.0, timeout: float = 120.0) -> None:
        """Stop the API server (every watch and connection ends), stay down ``down`` seconds,
        start it again with the same flags and port, and wait until it is ready."""
        system.stop(self.pids.pop("kube-apiserver"), timeout=10)
        time.sleep(down)
        self._spawn("kube-apiserver", self.argv["kube-apiserver"])
        self._wait_ready("kube-apiserver", "/readyz", time.monotonic() + timeout)

    def _check_alive(self, deadline: float, what: str) -> None:
        for component, pid in self.pids.items():
            if not system.alive(pid):
                raise LabCommandError(
                    f"{component} exited while waiting for {what}:\n" + _tail(self.log(component))
                )
        if time.monotonic() > deadline:
            raise LabCommandError(f"timed out waiting for {what}")

    def ssl_context(self) -> ssl.SSLContext:
        """TLS to the API server as the cluster admin."""
        admin = self.root / "pki"  # files, so a later process (the CLI) can use them too
        ctx = ssl.create_default_context(cafile=str(admin / "ca.crt"))
        ctx.load_cert_chain(str(admin / "admin.crt"), str(admin / "admin.key"))
        return ctx

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        timeout: float = 10.0,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        """One admin request (status, decoded JSON or text); for start-up checks and tests."""
        if self.netns is not None:
            return _in_thread_netns(
                self.netns, lambda: self._request(method, path, body, timeout, content_type)
            )
        return self._request(method, path, body, timeout, content_type)

    def _request(
        self, method: str, path: str, body: object, timeout: float, content_type: str
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context()) as r:
                status, raw = int(r.status), r.read()
        except urllib.error.HTTPError as e:
            status, raw = int(e.code), e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def _exists(self, path: str) -> bool:
        with contextlib.suppress(OSError):
            return self.request("GET", path, timeout=2)[0] == 200
        return False

    def _wait_ready(self, component: str, path: str, deadline: float) -> None:
        while True:
            with contextlib.suppress(OSError):
                if self.request("GET", path, timeout=2)[0] == 200:
                    return
            self._check_alive(deadline, f"{component} {path}")
            time.sleep(0.2)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        """kubectl (the one built with the cluster) as the admin."""
        proc = subprocess.run(
            self.in_netns(
                [str(self.bin / "kubectl"), f"--kubeconfig={self.admin_kubeconfig}", *args]
            ),
            input=input.encode() if input is not None else None,
            capture_output=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise LabCommandError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}): "
                f"{proc.stderr.decode().strip()}"
            )
        return proc.stdout.decode()

    def credential(self, name: str, *, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig for another x509 user (a lab node: ``system:node:<n>``/``system:nodes``)."""
        assert self.pki is not None
        cred = self.pki.issue(name, common_name=user, organizations=groups)
        return kubeconfig(
            self.root / f"{name}.kubeconfig",
            server=self.server,
            ca=self.pki.ca.cert,
            user=cred,
            name="ambient-lab",
        )

    def stop(self) -> None:
        """Stop in reverse start order (bounded per process), then remove ``root``."""
        for component in reversed(list(self.pids)):
            system.stop(self.pids.pop(component), timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> KubeCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _in_thread_netns(netns: str, fn: Callable[[], _T]) -> _T:
    """``fn()`` on a thread inside ``netns`` (sockets it opens live there); re-raises."""
    out: list[_T] = []
    err: list[BaseException] = []

    def body() -> None:
        try:
            with entered(netns):
                out.append(fn())
        except BaseException as e:  # handed to the caller's thread
            err.append(e)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"
