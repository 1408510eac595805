"""`ambientctl analyze`: find configuration mistakes in manifests before (or after) they hit
the mesh, istioctl-analyze style.

Owns the analyzers and their message codes. Parsing and translation are the control plane's
own (`controlplane.sources.files.parse_manifest_text`, `controlplane.translator.Translator`), so
`analyze` reports exactly what the control plane would do with the same objects. What the
control plane does not keep (annotations, VirtualService hosts) is read from the raw documents.

Codes (level: problem):
- AMB0001 Error: an object the control plane cannot read (it skips it).
- AMB0100 Info: another translation warning.
- AMB0101 Warning: namespace labelled for ambient, pod not captured (redirection not enabled,
  host network, or a label value other than ``ambient``).
- AMB0102 Error: service/namespace/pod/service account bound to a waypoint that does not exist
  (or is not a waypoint; Warning if the waypoint does not serve that kind of traffic).
- AMB0103 Warning: a policy node proxies enforce has L7 rules they cannot evaluate (or an
  action they ignore).
- AMB0104 Error: VirtualServices conflict (same host on the same gateway, or the mesh).
- AMB0105 Warning: PeerAuthentication STRICT while non-mesh pods exist (their plaintext
  connections are denied).
- AMB0106 Error: a security object (AuthorizationPolicy, RequestAuthentication,
  PeerAuthentication) is unreadable or not implemented and enforced fail-closed.
- AMB0201..AMB0205: unknown / refused / warned fields, kinds not implemented and invalid
  values, from the field table (`meshcore.config.fields`, ``docs/config-fields.md``).
- AMB0107 Error: the same object (kind, namespace, name) is defined more than once; the control
  plane keeps the last definition in file order, the others are silently replaced.

Invariants: `analyze` is pure over (documents, live pod states); messages are sorted and
deduplicated; a clean input gives no messages at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ambientctl.errors import CtlError
from controlplane.objects import KubeObject, Labels, PeerAuthentication, Pod
from controlplane.sources.files import SUFFIXES, parse_manifest_text
from controlplane.store import ConfigStore, StoreSnapshot
from controlplane.translate import (
    GATEWAY_NAME,
    USE_WAYPOINT,
    USE_WAYPOINT_NS,
    WAYPOINT_FOR,
    TranslateOptions,
    is_ambient,
)
from controlplane.translator import Translator
from meshcore.config.authorization import parse_policy
from meshcore.config.findings import Finding, check_labels, check_object
from meshcore.config.labels import DATAPLANE_MODE, selector_matches
from meshcore.config.objects import ROUTING_KINDS, parse_objects
from meshcore.errors import ConfigError

LEVELS = ("Info", "Warning", "Error")
_SECURITY_KINDS = ("AuthorizationPolicy", "RequestAuthentication", "PeerAuthentication")
REDIRECTION = "ambient.istio.io/redirection"
WAYPOINT_CLASS = "istio-waypoint"


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class Message:
    level_rank: int
    code: str
    ref: str
    text: str
    origin: str = ""

    @property
    def level(self) -> str:
        return LEVELS[self.level_rank]

    def render(self) -> str:
        where = f" [{self.origin}]" if self.origin else ""
        return f"{self.level} [{self.code}] ({self.ref}){where} {self.text}"

    def to_dict(self) -> dict[str, str]:
        return {
            "code": self.code,
            "level": self.level,
            "ref": self.ref,
            "message": self.text,
            "origin": self.origin,
        }


def _msg(level: str, code: str, ref: str, text: str, origin: str = "") -> Message:
    return Message(level_rank=LEVELS.index(level), code=code, ref=ref, text=text, origin=origin)


@dataclass(frozen=True, slots=True, kw_only=True)
class RawDoc:
    """A document as written (for what the typed records do not keep)."""

    origin: str
    body: Mapping[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))

    @property
    def meta(self) -> Mapping[str, Any]:
        m = self.body.get("metadata")
        return m if isinstance(m, Mapping) else {}

    @property
    def name(self) -> str:
        return str(self.meta.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.meta.get("namespace") or "default")

    @property
    def spec(self) -> Mapping[str, Any]:
        s = self.body.get("spec")
        return s if isinstance(s, Mapping) else {}


@dataclass(frozen=True, slots=True, kw_only=True)
class Input:
    """What is analyzed: the store snapshot (typed, as the control plane sees it), the raw
    documents, the source warnings, and optional live pod states (``ns/name`` ->
    redirection), e.g. from a lab, that override the pods' annotations."""

    snapshot: StoreSnapshot
    raw: tuple[RawDoc, ...] = ()
    source_warnings: Mapping[str, str] = field(default_factory=dict)
    live_redirection: Mapping[str, str] | None = None


# ----------------------------------------------------------------------------------- loading


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CtlError(f"{path}: no such file or directory")
    out: list[Path] = []
    for root, dirs, files in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / f for f in files if f.endswith(SUFFIXES) and not f.startswith("."))
    return sorted(out)


def load(paths: Sequence[Path], live_redirection: Mapping[str, str] | None = None) -> Input:
    """Read every manifest under `paths` the way the control plane's file source does."""
    store = ConfigStore()
    objects: list[KubeObject] = []
    warnings: dict[str, str] = {}
    raw: list[RawDoc] = []
    for base in paths:
        for path in _files(base):
            where = str(path)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                warnings[where] = f"unreadable: {err}"
                continue
            parsed = parse_manifest_text(text, where)
            objects.extend(parsed.objects)
            warnings.update(dict(parsed.warnings))
            try:
                docs = list(yaml.safe_load_all(text))
            except yaml.YAMLError:
                continue  # already reported by parse_manifest_text
            for i, doc in enumerate(docs):
                items = (
                    doc.get("items")
                    if isinstance(doc, dict) and doc.get("kind") == "List"
                    else [doc]
                )
                for item in items or ():
                    if isinstance(item, dict) and item.get("kind"):
                        raw.append(RawDoc(origin=f"{where}[{i}]", body=item))
    store.replace_source("analyze", objects)
    return Input(
        snapshot=store.snapshot,
        raw=tuple(raw),
        source_warnings=warnings,
        live_redirection=live_redirection,
    )


# ----------------------------------------------------------------------------------- analyzers


def _label(labels: Labels, key: str) -> str | None:
    return dict(labels).get(key)


def _origin(inp: Input, kind: str, ns: str, name: str) -> str:
    """Where the object the control plane keeps is defined: the LAST definition in file order
    (`controlplane.store` replaces earlier ones)."""
    found = ""
    for d in inp.raw:
        if d.kind == kind and d.name == name and (kind == "Namespace" or d.namespace == ns):
            found = d.origin
    return found


def _raw_key(d: RawDoc) -> tuple[str, str, str, str]:
    group = str(d.body.get("apiVersion", "")).rpartition("/")[0]
    return (group, d.kind, "" if d.kind == "Namespace" else d.namespace, d.name)


def duplicate_objects(inp: Input) -> list[Message]:
    seen: dict[tuple[str, str, str, str], list[str]] = {}
    for d in inp.raw:
        seen.setdefault(_raw_key(d), []).append(d.origin)
    out = []
    for (_group, kind, ns, name), origins in seen.items():
        if len(origins) > 1:
            ref = f"{kind} {ns + '/' if ns else ''}{name}"
            out.append(
                _msg(
                    "Error",
                    "AMB0107",
                    ref,
                    f"defined {len(origins)} times ({', '.join(origins)}); the control plane "
                    f"keeps the last one, {origins[-1]}, and ignores the others",
                    origins[-1],
                )
            )
    return out


def _annotations(inp: Input, pod: Pod) -> Mapping[str, str]:
    for d in inp.raw:
        if d.kind == "Pod" and d.name == pod.name and d.namespace == pod.namespace:
            a = d.meta.get("annotations")
            return {str(k): str(v) for k, v in a.items()} if isinstance(a, Mapping) else {}
    return {}


def not_captured(inp: Input) -> list[Message]:
    out: list[Message] = []
    for ns, objs in inp.snapshot.namespaces.items():
        ns_labels = objs.namespace.labels if objs.namespace is not None else ()
        value = _label(ns_labels, DATAPLANE_MODE)
        if value is None:
            continue
        ref = f"Namespace {ns}"
        if value not in ("ambient", "none"):
            out.append(
                _msg(
                    "Warning",
                    "AMB0101",
                    ref,
                    f"labelled {DATAPLANE_MODE}={value}: only 'ambient' enrolls, so none of "
                    f"its pods is captured",
                    _origin(inp, "Namespace", "", ns),
                )
            )
            continue
        if value != "ambient":
            continue
        for pod in objs.pods.values():
            if not is_ambient(pod, ns_labels):
                continue  # opted out with istio.io/dataplane-mode=none: intended
            pref = f"Pod {ns}/{pod.name}"
            origin = _origin(inp, "Pod", ns, pod.name)
            if pod.host_network:
                out.append(
                    _msg(
                        "Warning",
                        "AMB0101",
                        pref,
                        f"namespace {ns} is ambient but this pod uses the host network: it "
                        "cannot be captured and talks plaintext",
                        origin,
                    )
                )
                continue
            if inp.live_redirection is not None:
                state: str | None = inp.live_redirection.get(f"{ns}/{pod.name}", "")
            elif pod.ips or pod.phase == "Running":
                state = _annotations(inp, pod).get(REDIRECTION, "")
            else:
                state = None  # not running yet: nothing to compare
            if state is not None and state != "enabled":
                node = f" on {pod.node}" if pod.node else ""
                out.append(
                    _msg(
                        "Warning",
                        "AMB0101",
                        pref,
                        f"namespace {ns} is ambient but the pod is not captured "
                        f"({REDIRECTION}={state or '<unset>'}); is the node agent running"
                        f"{node}, and was the pod started before ambient-cni was "
                        "chained? Restart the pod or check `ambientctl lab pods` / the "
                        "agent's log",
                        origin,
                    )
                )
    return out


def _gateways(inp: Input) -> dict[tuple[str, str], RawDoc]:
    return {(d.namespace, d.name): d for d in inp.raw if d.kind == "Gateway"}


def missing_waypoints(inp: Input) -> list[Message]:
    out: list[Message] = []
    gateways = _gateways(inp)

    def check(kind: str, ns: str, name: str, labels: Labels, serves: str) -> None:
        wp = _label(labels, USE_WAYPOINT)
        if not wp or wp == "none":
            return
        wns = _label(labels, USE_WAYPOINT_NS) or ns
        ref = f"{kind} {ns}/{name}" if kind != "Namespace" else f"Namespace {name}"
        origin = _origin(inp, kind, ns, name)
        gw = gateways.get((wns, wp))
        if gw is None:
            out.append(
                _msg(
                    "Error",
                    "AMB0102",
                    ref,
                    f"bound to waypoint {wns}/{wp} ({USE_WAYPOINT}), but there is no "
                    f"Gateway {wns}/{wp}: traffic for it has no waypoint to go through. "
                    f"Create it (`ambientctl waypoint apply -n {wns} --name {wp}`) or fix "
                    "the label",
                    origin,
                )
            )
            return
        cls = gw.spec.get("gatewayClassName")
        if cls != WAYPOINT_CLASS:
            out.append(
                _msg(
                    "Error",
                    "AMB0102",
                    ref,
                    f"bound to Gateway {wns}/{wp}, which is not a waypoint "
                    f"(gatewayClassName {cls!r}, expected {WAYPOINT_CLASS!r})",
                    origin,
                )
            )
            return
        gw_labels = gw.meta.get("labels") if isinstance(gw.meta.get("labels"), Mapping) else {}
        wfor = str((gw_labels or {}).get(WAYPOINT_FOR, "service"))
        if serves != "any" and wfor not in (serves, "all"):
            out.append(
                _msg(
                    "Warning",
                    "AMB0102",
                    ref,
                    f"bound to waypoint {wns}/{wp}, which serves {wfor!r} traffic, not "
                    f"{serves}: the binding is ignored ({WAYPOINT_FOR} on the Gateway)",
                    origin,
                )
            )

    for ns, objs in inp.snapshot.namespaces.items():
        if objs.namespace is not None:
            check("Namespace", "", ns, objs.namespace.labels, "any")
        for svc in objs.services.values():
            check("Service", ns, svc.name, svc.labels, "service")
        for pod in objs.pods.values():
            if _label(pod.labels, GATEWAY_NAME) is None:
                check("Pod", ns, pod.name, pod.labels, "workload")
        for sa in objs.service_accounts.values():
            check("ServiceAccount", ns, sa.name, sa.labels, "workload")
    return out


def _warning_origin(inp: Input, ref: str) -> str:
    kind, _, rest = ref.partition(" ")
    ns, _, name = rest.partition("/")
    return _origin(inp, kind, ns, name) if name else ""


def translation_messages(inp: Input, opts: TranslateOptions) -> list[Message]:
    """Source warnings and the control plane's own translation warnings, classified."""
    out: list[Message] = []
    for ref, text in inp.source_warnings.items():
        if text.startswith("[AMB02"):
            continue  # a kind/field finding: reported by field_messages with its own code
        out.append(
            _msg(
                "Error", "AMB0001", ref, f"the control plane cannot read this and skips it: {text}"
            )
        )
    translator = Translator(opts)
    translator.update(inp.snapshot)
    for w in translator.warnings():
        origin = _warning_origin(inp, w.ref)
        if w.message.startswith("[AMB02"):
            continue  # a field finding: reported by field_messages with its own code
        if w.ref.startswith(_SECURITY_KINDS) and "fail-closed" in w.message:
            out.append(_msg("Error", "AMB0106", w.ref, w.message, origin))
        elif w.ref.startswith("AuthorizationPolicy") and (
            "cannot evaluate" in w.message or "not enforced by node proxies" in w.message
        ):
            out.append(
                _msg(
                    "Warning",
                    "AMB0103",
                    w.ref,
                    f"{w.message}. Node proxies enforce L4 only: attach the policy to a "
                    "waypoint (spec.targetRefs: kind Gateway or Service) to enforce L7",
                    origin,
                )
            )
        elif "waypoint" in w.message and "binding ignored" in w.message:
            continue  # reported by missing_waypoints with more context
        else:
            out.append(_msg("Info", "AMB0100", w.ref, w.message, origin))
    return out


def _fqdn(host: str, ns: str, suffix: str) -> str:
    if "*" in host or "." not in host:
        return f"{host}.{ns}.svc.{suffix}" if "*" not in host else host
    parts = host.split(".")
    if len(parts) == 2:  # name.namespace
        return f"{host}.svc.{suffix}"
    if len(parts) == 3 and parts[2] == "svc":
        return f"{host}.{suffix}"
    return host


def conflicting_virtual_services(inp: Input, opts: TranslateOptions) -> list[Message]:
    owners: dict[tuple[str, str], list[RawDoc]] = {}
    for d in inp.raw:
        if d.kind != "VirtualService":
            continue
        hosts = d.spec.get("hosts") or []
        gateways = d.spec.get("gateways") or ["mesh"]
        for h in hosts if isinstance(hosts, list) else []:
            for g in gateways if isinstance(gateways, list) else []:
                gw = str(g) if str(g) == "mesh" or "/" in str(g) else f"{d.namespace}/{g}"
                owners.setdefault((_fqdn(str(h), d.namespace, opts.domain_suffix), gw), []).append(
                    d
                )
    out: list[Message] = []
    for (host, gw), docs in sorted(owners.items()):
        if len(docs) < 2:
            continue
        names = ", ".join(sorted(f"{d.namespace}/{d.name}" for d in docs))
        for d in docs:
            out.append(
                _msg(
                    "Error",
                    "AMB0104",
                    f"VirtualService {d.namespace}/{d.name}",
                    f"host {host} on gateway {gw} is also routed by {names}: only one "
                    "of them takes effect (which one is undefined); merge them into one "
                    "VirtualService",
                    d.origin,
                )
            )
    return out


def _plaintext_pods(snap: StoreSnapshot) -> list[str]:
    """``ns/name`` of the running pods outside the mesh, sorted."""
    plain: list[str] = []
    for ns, objs in sorted(snap.namespaces.items()):
        ns_labels = objs.namespace.labels if objs.namespace is not None else ()
        for pod in sorted(objs.pods.values(), key=lambda p: p.name):
            if not is_ambient(pod, ns_labels) and pod.phase not in ("Succeeded", "Failed"):
                plain.append(f"{ns}/{pod.name}")
    return plain


def _strict_source(
    pod: Pod,
    ns: str,
    selector_pas: Sequence[PeerAuthentication],
    inherited: Sequence[tuple[str, str]],
) -> str | None:
    """The PeerAuthentication that makes mesh pod `pod` STRICT (a port-level one names its
    ports), or None: the first matching selector policy, else the first set `inherited` mode."""
    chain: list[tuple[str, str]] = []
    pa = next(
        (
            p
            for p in selector_pas
            if p.selector is not None and selector_matches(p.selector, pod.labels)
        ),
        None,
    )
    if pa is not None:
        strict_ports = [str(port) for port, m in pa.port_modes if m == "STRICT"]
        if strict_ports and pa.mode != "STRICT":
            return f"PeerAuthentication {ns}/{pa.name} (ports {','.join(strict_ports)})"
        chain.append((pa.mode, f"PeerAuthentication {ns}/{pa.name}"))
    for mode, ref in [*chain, *inherited]:
        if mode != "UNSET":
            return ref if mode == "STRICT" else None
    return None


def strict_with_plaintext_clients(inp: Input, opts: TranslateOptions) -> list[Message]:
    """PeerAuthentication making mesh workloads STRICT while pods outside the mesh exist: those
    clients talk plaintext, and STRICT denies plaintext at the node proxy
    (docs/reference/ambient-facts.md)."""
    snap = inp.snapshot
    plain = _plaintext_pods(snap)
    if not plain:
        return []
    root = snap.namespaces.get(opts.root_namespace)
    mesh_pa = sorted(
        (p for p in (root.peer_authentications.values() if root else ()) if p.selector is None),
        key=lambda p: p.name,
    )
    culprits: dict[str, list[str]] = {}  # PeerAuthentication ref -> strict mesh pods
    for ns, objs in snap.namespaces.items():
        ns_labels = objs.namespace.labels if objs.namespace is not None else ()
        ns_pa = sorted(
            (p for p in objs.peer_authentications.values() if p.selector is None),
            key=lambda p: p.name,
        )
        sel_pa = sorted(
            (p for p in objs.peer_authentications.values() if p.selector is not None),
            key=lambda p: p.name,
        )
        # The namespace's, then the mesh's policy: what a pod without its own policy inherits.
        inherited = [(p.mode, f"PeerAuthentication {ns}/{p.name}") for p in ns_pa[:1]]
        inherited += [
            (p.mode, f"PeerAuthentication {opts.root_namespace}/{p.name}") for p in mesh_pa[:1]
        ]
        for pod in objs.pods.values():
            if is_ambient(pod, ns_labels):
                ref = _strict_source(pod, ns, sel_pa, inherited)
                if ref is not None:
                    culprits.setdefault(ref, []).append(f"{ns}/{pod.name}")
    out = []
    shown = ", ".join(plain[:3]) + (f" and {len(plain) - 3} more" if len(plain) > 3 else "")
    for ref, pods in sorted(culprits.items()):
        kind_ref = ref.split(" (")[0]
        out.append(
            _msg(
                "Warning",
                "AMB0105",
                kind_ref,
                f"STRICT mTLS for {len(pods)} mesh pod(s) ({', '.join(sorted(pods)[:3])}"
                f"{'...' if len(pods) > 3 else ''}) while pods outside the mesh exist "
                f"({shown}): their plaintext connections to these pods are denied by the "
                "node proxy. Enroll the clients (istio.io/dataplane-mode=ambient) or use "
                "PERMISSIVE until they are",
                _warning_origin(inp, kind_ref),
            )
        )
    return out


def field_messages(inp: Input) -> list[Message]:
    """Every unknown, refused and warned field, and every kind not implemented, of every
    document (codes AMB0201..AMB0205 from the field table, `meshcore.config.fields`); policies
    through the one policy parser, as the control plane and the waypoint read them."""
    out: list[Message] = []
    for d in inp.raw:
        ref = f"{d.kind} {d.namespace}/{d.name}" if d.kind != "Namespace" else f"Namespace {d.name}"
        findings: Iterable[Finding]
        if d.kind in ("AuthorizationPolicy", "RequestAuthentication"):
            try:
                findings = parse_policy(d.body).findings
            except ConfigError:
                continue  # unreadable metadata: AMB0001 from the source
        elif d.kind in ROUTING_KINDS:
            # The waypoint's own parser: field findings plus what it says about values.
            body = dict(d.body)
            body["metadata"] = {**d.meta, "namespace": d.namespace}
            findings = [f for _ref, f in parse_objects([body]).findings]
        else:
            labels = d.meta.get("labels")
            findings = [
                *check_object(d.kind, d.body),
                *check_labels(d.kind, labels if isinstance(labels, Mapping) else {}),
            ]
        for f in findings:
            text = f.render() if f.path else f.message
            out.append(_msg(f.level, f.code, ref, text, d.origin))
    return out


def message_namespace(ref: str) -> str | None:
    """The namespace a message is about (``Kind ns/name`` or ``Namespace name``); None for a
    reference without one."""
    kind, _, rest = ref.partition(" ")
    if kind == "Namespace":
        return rest or None
    ns, sep, _name = rest.partition("/")
    return ns if sep else None


def analyze(inp: Input, opts: TranslateOptions | None = None) -> list[Message]:
    opts = opts or TranslateOptions()
    msgs: Iterable[Message] = [
        *field_messages(inp),
        *translation_messages(inp, opts),
        *not_captured(inp),
        *missing_waypoints(inp),
        *conflicting_virtual_services(inp, opts),
        *strict_with_plaintext_clients(inp, opts),
        *duplicate_objects(inp),
    ]
    return sorted(set(msgs), key=lambda m: (-m.level_rank, m.code, m.ref, m.text))
