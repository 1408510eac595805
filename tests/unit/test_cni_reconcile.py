"""cni.reconcile: the node agent's reconcile plan, as a pure function of what was read."""

from __future__ import annotations

import pytest

from cni.reconcile import AdoptablePod, PodRecord, World, applied, plan_reconcile


def rec(uid: str, *ips: str, adopted: bool = False, **kw: str) -> PodRecord:
    return PodRecord(
        uid=uid,
        namespace="mesh",
        name=uid,
        container_id="" if adopted else f"c-{uid}",
        netns="" if adopted else f"/run/netns/{uid}",
        ips=ips,
        host_ifname=f"veth-{uid}",
        **kw,  # type: ignore[arg-type]
    )


def api(uid: str, ip: str, *, host_network: bool = False) -> AdoptablePod:
    return AdoptablePod(uid=uid, namespace="mesh", name=uid, ips=(ip,), host_network=host_network)


def test_gone_pods_are_forgotten_and_their_ips_become_leftovers() -> None:
    registry = {"a": rec("a", "10.0.0.2"), "b": rec("b", "10.0.0.3")}
    world = World(
        alive=frozenset({"a"}),
        enrolled={"10.0.0.2": "a", "10.0.0.3": "b"},
        observed=frozenset({"10.0.0.9"}),
        ambient={"a": True},
    )
    plan = plan_reconcile(registry, world)
    assert set(plan.registry) == {"a"}
    assert plan.unenroll == ("10.0.0.3", "10.0.0.9")
    assert plan.changes == ("gone mesh/b", "leftover 10.0.0.3 removed", "leftover 10.0.0.9 removed")
    # a is already enrolled with its uid: nothing to do for it (ensure, not re-enroll)
    assert [(s.uid, s.ambient, s.enroll, s.observe) for s in plan.pods] == [("a", True, (), ())]


@pytest.mark.parametrize(
    ("ambient", "enrolled", "enroll", "observe"),
    [
        (True, {}, ("10.0.0.2", "10.0.0.4"), ()),
        (True, {"10.0.0.2": "a"}, ("10.0.0.4",), ()),
        (True, {"10.0.0.2": "other", "10.0.0.4": "a"}, ("10.0.0.2",), ()),
        (False, {"10.0.0.2": "a"}, (), ("10.0.0.2", "10.0.0.4")),
        (False, {}, (), ("10.0.0.2", "10.0.0.4")),
    ],
)
def test_pod_steps_follow_labels_and_the_pinned_map(
    ambient: bool, enrolled: dict[str, str], enroll: tuple[str, ...], observe: tuple[str, ...]
) -> None:
    registry = {"a": rec("a", "10.0.0.2", "10.0.0.4")}
    world = World(alive=frozenset({"a"}), enrolled=enrolled, ambient={"a": ambient})
    (steps,) = plan_reconcile(registry, world).pods
    assert (steps.ambient, steps.enroll, steps.observe) == (ambient, enroll, observe)


def test_adoption_and_deletion_with_an_inventory() -> None:
    registry = {
        "kept": rec("kept", "10.0.0.2"),  # plugin-ADDed: waits for its DEL even if the API lost it
        "old": rec("old", "10.0.0.3", adopted=True),  # adopted, deleted from the API
        "live": rec("live", "10.0.0.4", adopted=True),
    }
    api_pods = {
        "live": api("live", "10.0.0.4"),
        "new": api("new", "10.0.0.5"),
        "hostnet": api("hostnet", "192.168.1.10", host_network=True),
        "noveth": api("noveth", "10.0.0.6"),
    }
    world = World(
        alive=frozenset(registry),
        api_pods=api_pods,
        veths={"new": "veth-new"},
        enrolled={"10.0.0.3": "old"},
        ambient={"kept": False, "live": False, "new": True},
    )
    plan = plan_reconcile(registry, world)
    assert set(plan.registry) == {"kept", "live", "new"}
    assert plan.registry["new"].host_ifname == "veth-new"
    assert plan.registry["new"].container_id == ""
    assert plan.unenroll == ("10.0.0.3",)
    assert plan.changes == ("deleted mesh/old", "adopted mesh/new veth veth-new")
    assert plan.skipped == ("noveth",)
    assert [s.uid for s in plan.pods if s.enroll] == ["new"]


def test_without_inventory_nothing_is_adopted_or_deleted() -> None:
    registry = {"old": rec("old", "10.0.0.3", adopted=True)}
    world = World(alive=frozenset({"old"}), veths={"x": "veth-x"}, ambient={"old": True})
    plan = plan_reconcile(registry, world)
    assert set(plan.registry) == {"old"}
    assert plan.unenroll == ()
    assert plan.changes == ()


def test_replanning_after_apply_changes_nothing() -> None:
    """The ensure() property: once the plan's steps are in the map, a new plan has no steps
    that change it (observe is idempotent and may repeat)."""
    registry = {"a": rec("a", "10.0.0.2"), "b": rec("b", "10.0.0.3")}
    ambient = {"a": True, "b": False}
    world = World(alive=frozenset(registry), enrolled={"10.0.0.9": "x"}, ambient=ambient)
    plan = plan_reconcile(registry, world)
    enrolled = {ip: s.uid for s in plan.pods for ip in s.enroll}
    observed = frozenset(ip for s in plan.pods for ip in s.observe)
    after = {s.uid: applied(plan.registry[s.uid], s) for s in plan.pods}
    again = plan_reconcile(
        after, World(alive=frozenset(after), enrolled=enrolled, observed=observed, ambient=ambient)
    )
    assert again.unenroll == ()
    assert again.changes == ()
    assert all(not s.enroll for s in again.pods)
    assert {u: (p.redirection, p.ambient) for u, p in after.items()} == {
        "a": ("enabled", True),
        "b": ("", False),
    }


def test_applied_records_pending_with_the_error() -> None:
    pod = rec("a", "10.0.0.2")
    (steps,) = plan_reconcile({"a": pod}, World(alive=frozenset({"a"}), ambient={"a": True})).pods
    failed = applied(pod, steps, "map full")
    assert (failed.redirection, failed.error, failed.ambient) == ("pending", "map full", True)
