"""Random edits through the `Translator` (and so `retranslate_policies`, the policy-only
shortcut) give, after every step, exactly what `translate_namespace` gives from scratch:
records, warnings and node identities of every namespace (the shortcut's contract,
controlplane/translate.py). Seeded: a failure names its seed and step.

The edits cover every input the shortcut must notice or decline on: AuthorizationPolicies
(selectors moved, malformed, L7 attributes and unknown fields (warnings), AUDIT/CUSTOM,
targetRefs, reserved names that collide with a PeerAuthentication's DENY record),
PeerAuthentications (port-level too), RequestAuthentications and waypoint Gateways (stored
objects), pods, Services, EndpointSlices, ServiceAccounts and Namespace labels (waypoint bindings,
enrollment), in the root namespace too (mesh-wide inputs)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from controlplane import translator as translator_mod
from controlplane.objects import KubeObject, ObjectKey, parse_object
from controlplane.store import ConfigStore, StoreSnapshot
from controlplane.translate import (
    PEER_AUTHN_PREFIX,
    NamespaceResult,
    TranslateOptions,
    mesh_wide,
    translate_namespace,
)
from controlplane.translator import Translator, retranslate_policies
from meshcore.errors import ConfigError

OPTS = TranslateOptions()
NSS = ("default", "other", OPTS.root_namespace)
APPS = ("web", "db", "api")
Doc = dict[str, Any]
Rng = random.Random


def _selector(r: Rng) -> Any:
    c = r.random()
    if c < 0.35:
        return None
    if c < 0.9:
        return {"matchLabels": {"app": r.choice(APPS)}}
    if c < 0.95:
        return {"matchLabels": {"app": 5}}  # malformed: fail closed
    return {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}


def _rules(r: Rng) -> list[Doc]:
    out: list[Doc] = []
    for _ in range(r.randint(0, 2)):
        k = r.random()
        if k < 0.3:
            out.append({"from": [{"source": {"namespaces": [r.choice(NSS)]}}]})
        elif k < 0.45:
            sa = f"cluster.local/ns/default/sa/{r.choice(APPS)}"
            out.append({"from": [{"source": {"principals": [sa]}}]})
        elif k < 0.6:
            out.extend(_STRICT_DENY)
        elif k < 0.7:
            out.append({"to": [{"operation": {"ports": [str(r.choice([80, 8080, 9090]))]}}]})
        elif k < 0.8:
            out.append({"to": [{"operation": {"methods": ["GET"]}}]})  # L7: a warning
        elif k < 0.9:
            out.append({"bogus": 1})  # unknown field: a finding
        else:
            out.append({})
    return out


_USUAL_SELECTOR: dict[str, Any] = {
    "p1": None,
    "p2": {"matchLabels": {"app": "web"}},
    "p3": {"matchLabels": {"app": "db"}},
    "pa1": {"matchLabels": {"app": "web"}},
    "pa2": {"matchLabels": {"app": "db"}},
}
_STRICT_DENY = [{"from": [{"source": {"notPrincipals": ["*"]}}]}]
"""Rules of an AuthorizationPolicy translating to a STRICT PeerAuthentication's DENY record."""


def authorization_policy(r: Rng, ns: str) -> Doc:
    # The reserved names are those of the PeerAuthentications' DENY records below.
    base = r.choice(["p1", "p2", "p3", "pa1", "pa2"])
    name = f"{PEER_AUTHN_PREFIX}{base}" if base.startswith("pa") else base
    if base.startswith("pa") and r.random() < 0.3:
        # Named and shaped like PeerAuthentication `base`'s DENY record (review finding 1).
        spec_: Doc = {"selector": _USUAL_SELECTOR[base], "action": "DENY", "rules": _STRICT_DENY}
        meta = {"name": name, "namespace": ns}
        return {"kind": "AuthorizationPolicy", "metadata": meta, "spec": spec_}
    spec: Doc = {}
    # Mostly the policy's usual selector: a rules-only edit is the shortcut's case.
    sel = _USUAL_SELECTOR[base] if r.random() < 0.7 else _selector(r)
    if sel is not None:
        spec["selector"] = sel
    action = r.choice([None, "ALLOW", "DENY", "DENY", "AUDIT", "CUSTOM", "BOGUS"])
    if action:
        spec["action"] = action
    if r.random() < 0.85:
        spec["rules"] = _rules(r)
    if r.random() < 0.07:
        spec["targetRefs"] = [{"kind": "Service", "group": "", "name": "web"}]
    if r.random() < 0.05:
        spec["unknownField"] = True
    return {
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def peer_authentication(r: Rng, ns: str) -> Doc:
    name = r.choice(["pa1", "pa2", "nsw"])
    mode = r.choice(["STRICT", "PERMISSIVE", "UNSET", "DISABLE", "BAD"])
    spec: Doc = {"mtls": {"mode": mode}}
    if name != "nsw" and r.random() < 0.3:
        # STRICT on every port: its DENY record is the plain DENY of plaintext.
        spec = {"mtls": {"mode": "STRICT"}, "portLevelMtls": {"80": {"mode": "STRICT"}}}
        spec["selector"] = _USUAL_SELECTOR[name]
    elif name != "nsw":
        spec["selector"] = {"matchLabels": {"app": r.choice(APPS)}}
        if r.random() < 0.7:
            ports = r.sample([80, 8080, 9090], r.randint(1, 2))
            modes = ["STRICT", "PERMISSIVE", "DISABLE"]
            spec["portLevelMtls"] = {str(p): {"mode": r.choice(modes)} for p in ports}
    meta = {"name": name, "namespace": ns}
    return {"kind": "PeerAuthentication", "metadata": meta, "spec": spec}


def request_authentication(r: Rng, ns: str) -> Doc:
    spec: Doc = {"selector": {"matchLabels": {"app": r.choice(APPS)}}} if r.random() < 0.6 else {}
    spec["jwtRules"] = [{"issuer": r.choice(["x", "y"]), "jwksUri": "https://x/jwks"}]
    meta = {"name": "ra1", "namespace": ns}
    return {"kind": "RequestAuthentication", "metadata": meta, "spec": spec}


def gateway(r: Rng, ns: str) -> Doc:
    """A waypoint Gateway (or not: its class flips), bound by labels below."""
    labels = {"istio.io/waypoint-for": r.choice(["service", "workload", "all"])}
    return {
        "kind": "Gateway",
        "metadata": {"name": "wp", "namespace": ns, "labels": labels},
        "spec": {"gatewayClassName": r.choice(["istio-waypoint", "istio-waypoint", "other"])},
    }


def pod(r: Rng, ns: str) -> Doc:
    i = r.randint(1, 4)
    labels = {"app": r.choice(APPS)}
    if r.random() < 0.15:
        labels["istio.io/dataplane-mode"] = r.choice(["ambient", "none"])
    return {
        "kind": "Pod",
        "metadata": {"name": f"pod-{i}", "namespace": ns, "labels": labels},
        "spec": {
            "nodeName": "node-a",
            "serviceAccountName": r.choice(APPS),
            "containers": [{"ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {"podIP": f"10.{NSS.index(ns)}.0.{i}"},
    }


def namespace(r: Rng, ns: str) -> Doc:
    labels = {"istio.io/dataplane-mode": "ambient"} if r.random() < 0.7 else {}
    if r.random() < 0.3:
        labels["istio.io/use-waypoint"] = r.choice(["wp", "none"])
    return {"kind": "Namespace", "metadata": {"name": ns, "labels": labels}}


def service(r: Rng, ns: str) -> Doc:
    spec: Doc = {
        "clusterIP": f"10.96.{NSS.index(ns)}.1",
        "selector": {"app": r.choice(APPS)},
        "ports": [{"port": 80, "targetPort": r.choice(["http", 8080])}],
    }
    return {"kind": "Service", "metadata": {"name": "web", "namespace": ns}, "spec": spec}


def external_service(r: Rng, ns: str) -> Doc:
    """A selector-less Service: its pods come from its EndpointSlice."""
    spec = {"clusterIP": f"10.96.{NSS.index(ns)}.2", "ports": [{"port": r.choice([81, 82])}]}
    return {"kind": "Service", "metadata": {"name": "ext", "namespace": ns}, "spec": spec}


def endpoint_slice(r: Rng, ns: str) -> Doc:
    i = r.randint(1, 4)
    ep = {
        "addresses": [f"10.{NSS.index(ns)}.0.{i}"],
        "targetRef": {"kind": "Pod", "name": f"pod-{i}"},
    }
    meta = {"name": "ext-1", "namespace": ns, "labels": {"kubernetes.io/service-name": "ext"}}
    return {"kind": "EndpointSlice", "metadata": meta, "endpoints": [ep]}


def service_account(r: Rng, ns: str) -> Doc:
    labels = {"istio.io/use-waypoint": "wp"} if r.random() < 0.6 else {}
    meta = {"name": r.choice(APPS), "namespace": ns, "labels": labels}
    return {"kind": "ServiceAccount", "metadata": meta}


GENERATORS = (
    (authorization_policy, 14),
    (peer_authentication, 2),
    (request_authentication, 1),
    (gateway, 1),
    (pod, 2),
    (namespace, 1),
    (service, 1),
    (external_service, 1),
    (endpoint_slice, 1),
    (service_account, 1),
)


def _parse(docs: list[Doc]) -> list[KubeObject] | None:
    try:
        return [parse_object(d) for d in docs]
    except ConfigError:  # an edit the store would refuse: skip it
        return None


def _mismatch(t: Translator, snap: StoreSnapshot) -> str | None:
    mesh = mesh_wide(snap, OPTS)
    for ns, res in t.results.items():
        objs = snap.namespaces.get(ns)
        if objs is None:
            continue
        full = translate_namespace(objs, mesh, OPTS)
        for f in ("workloads", "services", "policies"):
            got, want = dict(getattr(res, f)), dict(getattr(full, f))
            if got != want:
                keys = sorted(k for k in {*got, *want} if got.get(k) != want.get(k))
                return f"namespace {ns}: {f} differ at {keys}"
        if sorted(res.warnings) != sorted(full.warnings):
            return f"namespace {ns}: warnings {set(res.warnings) ^ set(full.warnings)}"
        if res.node_identities != full.node_identities:
            return f"namespace {ns}: node identities differ"
    return None


def _run(seed: int, steps: int) -> tuple[str | None, int]:
    """(what differed at which step, or None; how many edits the shortcut answered)."""
    r = random.Random(seed)
    hits = 0

    def counting(*args: Any) -> NamespaceResult | None:
        nonlocal hits
        out = retranslate_policies(*args)
        hits += out is not None
        return out

    store = ConfigStore()
    init: list[Doc] = []
    for ns in NSS:
        init += [namespace(r, ns), service(r, ns), external_service(r, ns), gateway(r, ns)]
        init += [pod(r, ns) for _ in range(3)]
        init += [peer_authentication(r, ns) for _ in range(2)]
        init += [authorization_policy(r, ns) for _ in range(3)]
    objs = _parse(init)
    assert objs is not None
    store.replace_source("t", objs)
    t = Translator(OPTS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(translator_mod, "retranslate_policies", counting)
        t.update(store.snapshot)
        gens, weights = zip(*GENERATORS, strict=True)
        for step in range(steps):
            ups: list[Doc] = []
            dels: list[ObjectKey] = []
            for _ in range(r.choice([1, 1, 1, 2, 3])):
                ns = r.choice(NSS) if r.random() < 0.3 else "default"
                doc = r.choices(gens, weights)[0](r, ns)
                if doc["kind"] != "Namespace" and r.random() < 0.2:
                    name = doc["metadata"]["name"]
                    dels.append(ObjectKey(kind=doc["kind"], namespace=ns, name=name))
                else:
                    ups.append(doc)
            parsed = _parse(ups)
            if parsed is None:
                continue
            store.apply("t", parsed, dels)
            t.update(store.snapshot)
            problem = _mismatch(t, store.snapshot)
            if problem is not None:
                return f"seed {seed} step {step}: {problem}; edit {ups} {dels}", hits
    return None, hits


@pytest.mark.parametrize("seed", range(20))
def test_random_edits_equal_full_translation(seed: int) -> None:
    problem, hits = _run(seed, steps=60)
    assert problem is None, problem
    assert hits >= 3, "the shortcut answered too few edits to test it"
