"""A policy-only change re-translates the namespace's policies, not its pods
(`controlplane.translator.retranslate_policies`, used by the `Translator`; issue 14: ~6 ms of pod
translation at 10,000 pods before a policy change reached any proxy). Its result must equal the
full `translate_namespace` of the same objects, warnings and port-level PeerAuthentication
policies included; when the change is not policy-only, or moves a selector, it declines."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane import translate as translate_mod
from controlplane import translator as translator_mod
from controlplane.objects import ObjectKey, parse_object
from controlplane.store import ConfigStore, NamespaceObjects
from controlplane.translate import (
    TranslateOptions,
    mesh_wide,
    translate_namespace,
)
from controlplane.translator import Translator, retranslate_policies
from meshcore.model import Action

OPTS = TranslateOptions()
NS = {
    "kind": "Namespace",
    "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}},
}


def pod(name: str, ip: str, app: str) -> dict[str, Any]:
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"nodeName": "node-a", "serviceAccountName": name},
        "status": {"podIP": ip},
    }


def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    meta = {"name": name, "namespace": "default"}
    return {"kind": "AuthorizationPolicy", "metadata": meta, "spec": spec}


def from_ns(ns: str) -> list[dict[str, Any]]:
    return [{"from": [{"source": {"namespaces": [ns]}}]}]


WEB = {"matchLabels": {"app": "web"}}
BASE: list[dict[str, Any]] = [
    NS,
    pod("web-1", "10.0.0.1", "web"),
    pod("db-1", "10.0.0.2", "db"),
    {
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.1", "selector": {"app": "web"}, "ports": [{"port": 80}]},
    },
    # A port-level PeerAuthentication: its DENY policy is added while web-1 is translated.
    {
        "kind": "PeerAuthentication",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "selector": WEB,
            "mtls": {"mode": "STRICT"},
            "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}},
        },
    },
    policy("ns-wide", {"rules": from_ns("a")}),
    policy("web-only", {"selector": WEB, "rules": from_ns("b")}),
]

# (label, objects upserted, objects deleted (kind, name), the shortcut applies)
EDITS: list[tuple[str, list[dict[str, Any]], list[tuple[str, str]], bool]] = [
    ("namespace policy's rules", [policy("ns-wide", {"rules": from_ns("c")})], [], True),
    (
        "selector policy's rules",
        [policy("web-only", {"selector": WEB, "rules": from_ns("c")})],
        [],
        True,
    ),
    (
        "a rule with an L7 attribute (a warning appears)",
        [policy("ns-wide", {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]})],
        [],
        True,
    ),
    ("a namespace policy added", [policy("extra", {"action": "DENY", "rules": []})], [], True),
    ("a namespace policy deleted", [], [("AuthorizationPolicy", "ns-wide")], True),
    (
        "a selector moved to other pods",
        [policy("web-only", {"selector": {"matchLabels": {"app": "db"}}, "rules": from_ns("b")})],
        [],
        False,
    ),
    ("a selector policy deleted", [], [("AuthorizationPolicy", "web-only")], False),
    (
        "a policy and a pod in one change",
        [policy("ns-wide", {"rules": from_ns("c")}), pod("db-1", "10.0.0.2", "db2")],
        [],
        False,
    ),
]


@pytest.mark.parametrize(
    ("label", "upserts", "deletes", "applies"), EDITS, ids=[e[0] for e in EDITS]
)
def test_policy_edit_result_equals_full_translation(
    label: str, upserts: list[dict[str, Any]], deletes: list[tuple[str, str]], applies: bool
) -> None:
    store = ConfigStore()
    store.replace_source("t", [parse_object(d) for d in BASE])
    before = store.snapshot.namespaces["default"]
    mesh = mesh_wide(store.snapshot, OPTS)
    old = translate_namespace(before, mesh, OPTS)
    assert len(old.policies) == 3, "two policies and the port-level PeerAuthentication DENY"
    keys = [ObjectKey(kind=k, namespace="default", name=n) for k, n in deletes]
    store.apply("t", [parse_object(d) for d in upserts], keys)
    after = store.snapshot.namespaces["default"]
    assert mesh_wide(store.snapshot, OPTS) == mesh
    short = retranslate_policies(before, old, after, mesh, OPTS)
    full = translate_namespace(after, mesh, OPTS)
    assert full != old, label
    if applies:
        assert short == full, label
        assert short is not None
        assert short.workloads is old.workloads, "no pod translated again"
    else:
        assert short is None, label


def test_translator_translates_no_pod_for_a_policy_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `Translator` uses the shortcut: a policy edit calls no `translate_namespace` (before
    this change every policy edit translated the namespace's every pod) and its delta is the
    policy alone; a pod edit still translates the namespace."""
    store = ConfigStore()
    store.replace_source("t", [parse_object(d) for d in BASE])
    t = Translator(OPTS)
    t.update(store.snapshot)
    calls: list[str] = []

    def counting(objs: Any, mesh: Any, opts: Any) -> Any:
        calls.append(objs.name)
        return translate_namespace(objs, mesh, opts)

    monkeypatch.setattr(translator_mod, "translate_namespace", counting)
    store.apply("t", [parse_object(policy("ns-wide", {"rules": from_ns("c")}))])
    delta = t.update(store.snapshot)
    assert calls == []
    assert [getattr(r, "key", None) for r in delta.upserts] == ["default/ns-wide"]
    assert not delta.removed_addresses
    assert not delta.removed_policies
    fresh = Translator(OPTS)
    fresh.update(store.snapshot)
    assert sorted(map(repr, t.records())) == sorted(map(repr, fresh.records()))
    assert sorted(t.warnings()) == sorted(fresh.warnings())
    calls.clear()
    store.apply("t", [parse_object(pod("db-1", "10.0.0.2", "db2"))])
    t.update(store.snapshot)
    assert calls == ["default"]


RESERVED = "istio_converted_peer_authn_web"  # the name port-level PeerAuthentication "web" gets


STRICT_PA = {
    "kind": "PeerAuthentication",
    "metadata": {"name": "web", "namespace": "default"},
    "spec": {
        "selector": WEB,
        "mtls": {"mode": "STRICT"},
        "portLevelMtls": {"80": {"mode": "STRICT"}},
    },
}
"""STRICT on the `web` pods and on port 80 (a port-level policy: its DENY record is named after
the PeerAuthentication, `istio_converted_peer_authn_web`)."""


def test_policy_named_like_a_peer_authentication_deny_keeps_the_deny() -> None:
    """An AuthorizationPolicy named like the port-level PeerAuthentication's DENY record
    (the reviewer's reproducer): the shortcut took that key for the policy's own and its next
    edit replaced the DENY of plaintext; the full translation let the DENY replace the user's
    policy silently. Now: the shortcut's result is the full translation's, the DENY stays, and
    the user's policy is enforced fail-closed under another name, with a warning."""
    # The policy translates to exactly the DENY record the PeerAuthentication gets (STRICT on
    # every port), so the record under that key looked like the policy's own.
    rules = [{"from": [{"source": {"notPrincipals": ["*"]}}]}]
    reserved = policy(RESERVED, {"selector": WEB, "action": "DENY", "rules": rules})
    store = ConfigStore()
    store.replace_source(
        "t", [parse_object(d) for d in (NS, pod("web-1", "10.0.0.1", "web"), STRICT_PA, reserved)]
    )
    t = Translator(OPTS)
    t.update(store.snapshot)
    key = f"default/{RESERVED}"
    deny = t.results["default"].policies[key]
    edited = policy(RESERVED, {"selector": WEB, "action": "DENY", "rules": from_ns("nobody")})
    store.apply("t", [parse_object(edited)])
    t.update(store.snapshot)
    full = translate_namespace(
        store.snapshot.namespaces["default"], mesh_wide(store.snapshot, OPTS), OPTS
    )
    assert dict(t.results["default"].policies) == dict(full.policies)
    assert t.results["default"].warnings == full.warnings
    assert full.policies[key] == deny, "the PeerAuthentication's DENY is never displaced"
    assert deny.action is Action.DENY
    assert deny.rules[0].clauses[0].matches[0].not_principals


def test_reserved_name_policy_is_enforced_fail_closed_and_reported() -> None:
    """Full translation: an ALLOW policy named with the reserved prefix, selecting a pod the
    PeerAuthentication does not select (db-1). It was replaced by the PeerAuthentication's DENY
    record under its key, so db-1 lost its allow-list (allowed everyone with a principal). Now
    it allows nothing under a name of its own, web-1 keeps the DENY, and a warning says why."""
    objs = [
        *BASE,
        policy(RESERVED, {"selector": {"matchLabels": {"app": "db"}}, "rules": from_ns("a")}),
    ]
    store = ConfigStore()
    store.replace_source("t", [parse_object(d) for d in objs])
    res = translate_namespace(
        store.snapshot.namespaces["default"], mesh_wide(store.snapshot, OPTS), OPTS
    )
    key = f"default/{RESERVED}"
    rejected = f"default/istio_converted_rejected_{RESERVED}"
    assert res.policies[key].action is Action.DENY  # the PeerAuthentication's
    web = res.workloads["Kubernetes//Pod/default/web-1"]
    db = res.workloads["Kubernetes//Pod/default/db-1"]
    assert key in web.authorization_policies
    assert key not in db.authorization_policies
    assert rejected in db.authorization_policies
    fail_closed = res.policies[rejected]
    assert (fail_closed.action, fail_closed.rules) == (Action.ALLOW, ()), "allows nothing"
    notes = [w.message for w in res.warnings if w.ref == f"AuthorizationPolicy {key}"]
    assert any("reserved" in n and "fail-closed" in n for n in notes), notes


@pytest.mark.parametrize(
    ("ns", "name"),
    [("istio-system", "istio_converted_static_strict"), ("default", "istio_requestauthn_jwt")],
)
def test_other_reserved_names_never_displace_a_converted_policy(ns: str, name: str) -> None:
    """The shared STRICT policy and a RequestAuthentication's record cannot be displaced by an
    AuthorizationPolicy of the same name either (the STRICT policy replaced such a policy
    silently; an AuthorizationPolicy sorted before the RequestAuthentication was replaced)."""
    ra = {
        "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "default"},
        "spec": {"jwtRules": [{"issuer": "x", "jwksUri": "https://x/jwks"}]},
    }
    ap = {
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"action": "DENY", "rules": from_ns("a")},
    }
    store = ConfigStore()
    store.replace_source("t", [parse_object(d) for d in (*BASE, ra, ap)])
    mesh = mesh_wide(store.snapshot, OPTS)
    res = translate_namespace(store.snapshot.namespaces[ns], mesh, OPTS)
    alone = ConfigStore()
    alone.replace_source("t", [parse_object(d) for d in (*BASE, ra)])
    before = translate_namespace(
        alone.snapshot.namespaces.get(ns, NamespaceObjects(name=ns)),
        mesh_wide(alone.snapshot, OPTS),
        OPTS,
    )
    assert res.policies[f"{ns}/{name}"] == before.policies[f"{ns}/{name}"]
    rejected = res.policies[f"{ns}/istio_converted_rejected_{name}"]
    assert rejected.action is Action.DENY, "denies everything (fail closed)"
    assert rejected.rules
    assert any("reserved" in w.message for w in res.warnings)


def test_shortcut_declines_a_shared_key_even_without_reserved_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The shortcut's own guard, should the reserved names ever let an AuthorizationPolicy's
    key be a PeerAuthentication DENY record's: it declines, so the reviewer's edit gives the
    full translation's result (whatever that is), never the shortcut's own."""
    monkeypatch.setattr(translate_mod, "_reserved_prefix", lambda ap: None)
    rules = [{"from": [{"source": {"notPrincipals": ["*"]}}]}]
    objs = (NS, pod("web-1", "10.0.0.1", "web"), STRICT_PA)
    store = ConfigStore()
    store.replace_source(
        "t",
        [
            parse_object(d)
            for d in (*objs, policy(RESERVED, {"selector": WEB, "action": "DENY", "rules": rules}))
        ],
    )
    before = store.snapshot.namespaces["default"]
    mesh = mesh_wide(store.snapshot, OPTS)
    old = translate_namespace(before, mesh, OPTS)
    assert f"default/{RESERVED}" in old.policies  # the shared key, as on the branch before
    edited = policy(RESERVED, {"selector": WEB, "action": "DENY", "rules": from_ns("nobody")})
    store.apply("t", [parse_object(edited)])
    assert (
        retranslate_policies(before, old, store.snapshot.namespaces["default"], mesh, OPTS) is None
    )
