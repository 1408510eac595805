"""A policy-only change re-translates the namespace's policies, not its pods
(`controlplane.translate.retranslate_policies`, used by the `Translator`; issue 14: ~6 ms of pod
translation at 10,000 pods before a policy change reached any proxy). Its result must equal the
full `translate_namespace` of the same objects, warnings and port-level PeerAuthentication
policies included; when the change is not policy-only, or moves a selector, it declines."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane import translator as translator_mod
from controlplane.objects import ObjectKey, parse_object
from controlplane.store import ConfigStore
from controlplane.translate import (
    TranslateOptions,
    mesh_wide,
    retranslate_policies,
    translate_namespace,
)
from controlplane.translator import Translator

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
