"""Fan-out of one change to many connections (controlplane.xds, issue 14): the shared encoding
of a change never carries one proxy's resources to another proxy with a different scope, and
what is on the wire decodes to exactly the response built for that connection alone; the write
loop (one Event per connection) loses no push, also one published while it is writing."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from controlplane.translator import Delta
from controlplane.xds import ProxyConnection, XdsServer, resource_version
from meshcore.model import Authorization, Service, Workload
from meshcore.proto import discovery_pb2 as dpb
from meshcore.proto.convert import ADDRESS_TYPE, AUTHORIZATION_TYPE, pack, resource_name
from meshcore.proto.yamlform import parse_mesh_config, parse_service, parse_workload

SVC_A = "default/a.default.svc.cluster.local"
SVC_B = "default/b.default.svc.cluster.local"


def wl(name: str, node: str, ip: str, svc: str) -> Workload:
    ports = {"ports": [{"servicePort": 80, "targetPort": 8080}]}
    return parse_workload(
        {
            "uid": name,
            "name": name,
            "namespace": "default",
            "addresses": [ip],
            "node": node,
            "services": {svc: ports},
        }
    )


def svc(name: str, vip: str) -> Service:
    return parse_service(
        {
            "name": name,
            "namespace": "default",
            "hostname": f"{name}.default.svc.cluster.local",
            "addresses": [{"address": vip}],
            "ports": [{"servicePort": 80, "targetPort": 8080}],
        }
    )


def policy(ns: str) -> Authorization:
    rule = {"clauses": [{"matches": [{"namespaces": [ns]}]}]}
    doc = {"name": "p", "namespace": "default", "scope": "NAMESPACE", "rules": [rule]}
    return parse_mesh_config({"policies": [doc]}).policies[0]


def connect(srv: XdsServer, cid: int, node: str, on_demand: bool) -> ProxyConnection:
    conn = ProxyConnection(id=cid, node=node, peer="test", connected_at=0.0)
    srv.connections[cid] = conn
    sub, unsub = (["*"], ["*"]) if on_demand else ([], [])
    for type_url in (AUTHORIZATION_TYPE, ADDRESS_TYPE):
        req = dpb.DeltaDiscoveryRequest(
            type_url=type_url, resource_names_subscribe=sub, resource_names_unsubscribe=unsub
        )
        srv._handle_request(conn, req)
        assert srv._build(conn, type_url) is not None  # the initial state
    return conn


def reference(resp: dpb.DeltaDiscoveryResponse, records: list[Any]) -> dpb.DeltaDiscoveryResponse:
    """The response built alone for one connection, by protobuf (no pre-encoded bytes): what the
    shared bytes must decode to."""
    out = dpb.DeltaDiscoveryResponse(
        type_url=resp.type_url, nonce=resp.nonce, system_version_info=resp.system_version_info
    )
    for rec in sorted(records, key=resource_name):
        r = out.resources.add(name=resource_name(rec), version=_version(rec))
        r.resource.CopyFrom(pack(rec))
        if isinstance(rec, Workload):
            r.aliases.extend(f"{rec.network}/{a}" for a in rec.addresses)
    return out


def _version(rec: Any) -> str:
    return resource_version(pack(rec).SerializeToString(deterministic=True))


def decoded(raw: bytes | None) -> dpb.DeltaDiscoveryResponse:
    assert raw is not None
    resp = dpb.DeltaDiscoveryResponse()
    resp.ParseFromString(raw)
    # Resource order inside a response is not meaningful (a set of names): compare sorted.
    ordered = sorted(resp.resources, key=lambda r: r.name)
    del resp.resources[:]
    resp.resources.extend(ordered)
    return resp


def test_shared_change_never_crosses_scopes_and_decodes_as_built_alone() -> None:
    async def scenario() -> None:  # ProxyConnection holds an asyncio.Event: inside a loop
        a1, b1 = wl("a1", "n1", "10.0.1.1", SVC_A), wl("b1", "n2", "10.0.2.1", SVC_B)
        srv = XdsServer()
        srv.publish(Delta(upserts=(svc("a", "10.96.0.1"), svc("b", "10.96.0.2"), a1, b1)))
        srv.publish(Delta(upserts=(policy("x"),)))
        n1 = connect(srv, 1, "n1", on_demand=True)
        n2 = connect(srv, 2, "n2", on_demand=True)
        n1b = connect(srv, 3, "n1", on_demand=True)  # same node, same scope as n1
        everyone = connect(srv, 4, "n1", on_demand=False)
        assert set(n1.types[ADDRESS_TYPE].known) == {"a1", SVC_A}
        assert set(n2.types[ADDRESS_TYPE].known) == {"b1", SVC_B}

        # One change touching both scopes and the policy every proxy holds.
        a1v2 = replace(a1, canonical_revision="v2")
        b1v2 = replace(b1, canonical_revision="v2")
        pol = policy("y")
        srv.publish(Delta(upserts=(a1v2, b1v2, pol)))
        conns = (n1, n2, n1b, everyone)
        auth = [srv._build(c, AUTHORIZATION_TYPE) for c in conns]
        addr = [srv._build(c, ADDRESS_TYPE) for c in conns]

        # Each scope gets its own pods, never the other's, even though encodings are shared.
        names = [sorted(r.name for r in decoded(raw).resources) for raw in addr]
        assert names == [["a1"], ["b1"], ["a1"], ["a1", "b1"]]
        assert addr[0] is addr[2], "same change, same scope: one encoding"
        assert addr[1] is not addr[0]
        assert addr[3] is not addr[0]
        # The policy goes to everyone as one encoding (one nonce).
        assert auth[0] is not None
        assert all(raw is auth[0] for raw in auth)

        # On the wire: exactly what a response built alone for that connection decodes to.
        for raw, recs in ((addr[0], [a1v2]), (addr[1], [b1v2]), (addr[3], [a1v2, b1v2])):
            got = decoded(raw)
            assert got == reference(got, recs)
        got = decoded(auth[0])
        assert got == reference(got, [pol])
        # Nonces: each connection's pending nonces are its own responses, ACKs clear them.
        for c, raw in zip(conns, addr, strict=True):
            nonce = decoded(raw).nonce
            assert nonce in c.pending
            srv._handle_request(
                c, dpb.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE, response_nonce=nonce)
            )
            assert nonce not in c.pending
            assert c.types[ADDRESS_TYPE].last_ack == nonce

    asyncio.run(scenario())


def _write_loop(
    srv: XdsServer, ctx: Any
) -> tuple[ProxyConnection, asyncio.Event, asyncio.Future[None]]:
    """One proxy connection subscribed to Authorization, its reader waiting on the returned
    Event, and `srv`'s write loop for it writing to `ctx` (a stand-in ServicerContext)."""
    conn = ProxyConnection(id=1, node="n1", peer="test", connected_at=0.0)
    srv.connections[1] = conn
    stop = asyncio.Event()

    async def reader() -> None:
        srv._handle_request(conn, dpb.DeltaDiscoveryRequest(type_url=AUTHORIZATION_TYPE))
        await stop.wait()

    task = asyncio.get_running_loop().create_task(reader())
    return conn, stop, asyncio.ensure_future(srv._write_loop(conn, ctx, task))


def test_write_loop_pushes_then_ends_with_its_reader() -> None:
    """The write loop wakes on its connection's Event for each push, and ends when its reader
    does (also when the reader ends while no push is pending)."""

    class Context:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        async def write(self, message: bytes) -> None:
            self.sent.append(message)

    async def scenario() -> None:
        srv = XdsServer()
        srv.publish(Delta(upserts=(policy("x"),)))
        ctx = Context()
        _conn, stop, loop_task = _write_loop(srv, ctx)
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(ctx.sent) == 1  # the initial state
        srv.publish(Delta(upserts=(policy("y"),)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(ctx.sent) == 2
        assert [r.name for r in decoded(ctx.sent[1]).resources] == ["default/p"]
        stop.set()
        await asyncio.wait_for(loop_task, 1)
        assert len(ctx.sent) == 2

    asyncio.run(scenario())


def test_write_loop_sends_a_push_queued_during_a_slow_write_next_in_order() -> None:
    """A change published while `write` still sends the previous response (a slow peer) is not
    lost: once that write completes, the loop sends it next, with its own (greater) nonce that
    the connection awaits an ACK for. Fails if the loop cleared its Event after its writes (the
    wake-up set during the write would be erased: checked)."""

    class SlowContext:
        def __init__(self, srv: XdsServer) -> None:
            self.srv = srv
            self.sent: list[bytes] = []
            self.gate = asyncio.Event()

        async def write(self, message: bytes) -> None:
            self.sent.append(message)
            if len(self.sent) == 1:
                self.srv.publish(Delta(upserts=(policy("y"),)))  # queued during the write
                await self.gate.wait()  # the peer reads slowly

    async def settle() -> None:
        for _ in range(10):
            await asyncio.sleep(0)

    async def scenario() -> None:
        srv = XdsServer()
        srv.publish(Delta(upserts=(policy("x"),)))
        ctx = SlowContext(srv)
        conn, stop, loop_task = _write_loop(srv, ctx)
        await settle()
        assert len(ctx.sent) == 1, "the first write is still in progress"
        ctx.gate.set()
        await settle()
        assert len(ctx.sent) == 2, "the push queued during the write went out"
        first, second = decoded(ctx.sent[0]), decoded(ctx.sent[1])
        assert [(r.name, r.version) for r in first.resources] == [
            ("default/p", _version(policy("x")))
        ]
        assert [(r.name, r.version) for r in second.resources] == [
            ("default/p", _version(policy("y")))
        ], "in order: the newer policy last"
        assert int(second.nonce, 16) > int(first.nonce, 16)
        assert set(conn.pending) == {first.nonce, second.nonce}
        for nonce in (first.nonce, second.nonce):
            ack = dpb.DeltaDiscoveryRequest(type_url=AUTHORIZATION_TYPE, response_nonce=nonce)
            srv._handle_request(conn, ack)
        assert not conn.pending
        assert conn.types[AUTHORIZATION_TYPE].last_ack == second.nonce
        await settle()
        assert len(ctx.sent) == 2, "an ACK alone sends nothing"
        stop.set()
        await asyncio.wait_for(loop_task, 1)

    asyncio.run(scenario())
