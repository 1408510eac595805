"""A mesh with a waypoint on 127.0.8x.x, all real sockets, real mTLS/HBONE, one event loop.

(Helpers only; the tests are in the other tests/loopback/test_waypoint_*.py modules.)

  node-a 127.0.81.1   client pod 127.0.81.10 (sa sleep)      outbound bound on the VIPs
  node-b 127.0.82.1   reviews-v1 127.0.82.11, -v2 .12, -v3 .13 (sa reviews, :9080)
                      shadow 127.0.82.21 (sa shadow, :9080), grpc-echo 127.0.82.31 (:50051)
  node-w              waypoint 127.0.84.10:15008 (sa waypoint, no node proxy: it listens itself)
  services            reviews 127.0.83.10:9080, shadow 127.0.83.11:9080, grpc 127.0.83.12:50051,
                      waypoint 127.0.83.20:15008 (fronts the waypoint workload)

Path: client -> node-a (SOURCE identity sleep) -> HBONE -> waypoint (L7) -> HBONE with the
WAYPOINT identity -> node-b -> backend. Backends are aiohttp servers (an independent HTTP
implementation), so the waypoint's codec is checked against another one on both sides.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from aiohttp import ClientSession, ClientTimeout, TCPConnector, WSMsgType, web

import tests.helpers as helpers
from meshcore.ca import MeshCA
from meshcore.certs import LocalCAProvider, utcnow
from meshcore.config.objects import parse_objects
from meshcore.proto.yamlform import parse_mesh_config
from meshcore.state import MeshState
from waypoint.app import Waypoint, build_context
from waypoint.context import WaypointSettings
from ztunnel.app import NodeProxy
from ztunnel.contexts import build_context as node_context
from ztunnel.proxy.context import ProxySettings

CLIENT_IP = "127.0.81.10"
V1, V2, V3 = "127.0.82.11", "127.0.82.12", "127.0.82.13"
SHADOW_IP = "127.0.82.21"
GRPC_IP = "127.0.82.31"
REVIEWS_VIP, SHADOW_VIP, GRPC_VIP = "127.0.83.10", "127.0.83.11", "127.0.83.12"
WAYPOINT_IP = "127.0.84.10"
PORT = 9080
GRPC_PORT = 50051
REVIEWS = f"http://{REVIEWS_VIP}:{PORT}"
DB_VIP, DB_V2_VIP, DB_PORT = "127.0.83.30", "127.0.83.31", 7000
"""A non-HTTP service bound to the waypoint (TCP through the waypoint); tests run its servers
on the reviews-v1/v2 pod addresses."""
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
WAYPOINT_ID = "spiffe://cluster.local/ns/default/sa/waypoint"
WAYPOINT_SVC = "default/waypoint.default.svc.cluster.local"


def _wl(
    uid: str, ip: str, sa: str, node: str, version: str = "", **services: int
) -> dict[str, Any]:
    return {
        "uid": uid,
        "name": uid,
        "namespace": "default",
        "serviceAccount": sa,
        "addresses": [ip],
        "node": node,
        "tunnelProtocol": "HBONE",
        "canonicalName": sa,
        "canonicalRevision": version,
        "services": {
            f"default/{svc}.default.svc.cluster.local": {
                "ports": [{"servicePort": port, "targetPort": port}]
            }
            for svc, port in services.items()
        },
    }


def _svc(name: str, vip: str, port: int, waypoint: bool = True, proto: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "namespace": "default",
        "hostname": f"{name}.default.svc.cluster.local",
        "addresses": [{"address": vip}],
        "ports": [{"servicePort": port, "targetPort": port}],
    }
    if proto:
        out["ports"][0]["appProtocol"] = proto
    if waypoint:
        out["waypoint"] = {"hostname": WAYPOINT_SVC}
    return out


def mesh_config() -> dict[str, Any]:
    out = _mesh_config()
    # db (bound to the waypoint) on reviews-v1 and v2; db-v2 (not bound) on v2 only.
    for wl in out["workloads"]:
        if wl["uid"] in ("reviews-v1", "reviews-v2"):
            names = ("db", "db-v2") if wl["uid"] == "reviews-v2" else ("db",)
            for name in names:
                wl["services"][f"default/{name}.default.svc.cluster.local"] = {
                    "ports": [{"servicePort": DB_PORT, "targetPort": DB_PORT}]
                }
    out["services"] += [_svc("db", DB_VIP, DB_PORT), _svc("db-v2", DB_V2_VIP, DB_PORT, False)]
    return out


def static_waypoint_argv(tmp: Path, *extra: str) -> list[str]:
    """The waypoint command in static mode for this mesh (``tmp/mesh.yaml``, written here, and
    the CA in ``tmp/ca``), listening on its workload address; `extra` flags appended."""
    (tmp / "mesh.yaml").write_text(yaml.safe_dump(mesh_config()))
    return [
        sys.executable,
        "-m",
        "waypoint.app",
        "--name",
        "waypoint",
        "--namespace",
        "default",
        "--workload-uid",
        "waypoint",
        "--mesh-config",
        str(tmp / "mesh.yaml"),
        "--ca-dir",
        str(tmp / "ca"),
        "--listen",
        f"{WAYPOINT_IP}:15008",
        "--no-access-log",
        *extra,
    ]


def _mesh_config() -> dict[str, Any]:
    return {
        "workloads": [
            _wl("client", CLIENT_IP, "sleep", "node-a"),
            _wl("reviews-v1", V1, "reviews", "node-b", "v1", reviews=PORT, **{"reviews-v1": PORT}),
            _wl("reviews-v2", V2, "reviews", "node-b", "v2", reviews=PORT, **{"reviews-v2": PORT}),
            _wl("reviews-v3", V3, "reviews", "node-b", "v3", reviews=PORT),
            _wl("shadow", SHADOW_IP, "shadow", "node-b", "v1", shadow=PORT),
            _wl("grpc-echo", GRPC_IP, "grpc", "node-b", "v1", grpc=GRPC_PORT),
            _wl("waypoint", WAYPOINT_IP, "waypoint", "node-w", waypoint=15008),
        ],
        "services": [
            _svc("reviews", REVIEWS_VIP, PORT),
            _svc("shadow", SHADOW_VIP, PORT, waypoint=False),
            _svc("grpc", GRPC_VIP, GRPC_PORT, proto="GRPC"),
            _svc("waypoint", "127.0.83.20", 15008, waypoint=False),
            _svc("reviews-v1", "127.0.83.21", PORT, waypoint=False),
            _svc("reviews-v2", "127.0.83.22", PORT, waypoint=False),
        ],
    }


@dataclass
class Backend:
    """One aiohttp app instance (a pod). Behaviour is steered by request headers."""

    name: str
    ip: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_all: int = 0
    """Answer every request with this status (0 = off)."""
    runner: web.AppRunner | None = None


@dataclass
class Backends:
    pods: dict[str, Backend]
    fail_counters: Counter[str] = field(default_factory=Counter)

    def hits(self, name: str, path_prefix: str = "/") -> int:
        return sum(1 for r in self.pods[name].requests if r["path"].startswith(path_prefix))


async def _handler(backend: Backend, all_: Backends, request: web.Request) -> web.StreamResponse:
    upgrade = request.headers.get("upgrade", "").lower() == "websocket"
    if upgrade and "x-test-no-upgrade" not in request.headers:
        return await _websocket(backend, request)
    if request.path == "/sink":
        return await _sink(backend, request)
    body = await request.read() if request.path != "/echo" else b""
    record = {
        "path": request.path_qs,
        "method": request.method,
        "headers": dict(request.headers),
        "body_len": len(body),
        "host": request.host,
        "peer": request.transport.get_extra_info("peername")[0] if request.transport else "",
    }
    backend.requests.append(record)
    h = request.headers
    if "x-test-delay" in h:
        await asyncio.sleep(float(h["x-test-delay"]))
    if backend.fail_all:
        return web.Response(status=backend.fail_all, text=f"{backend.name} failing\n")
    if "x-test-fail-times" in h:  # "key:N" -> the first N requests carrying that key get 503
        key, _, n = h["x-test-fail-times"].partition(":")
        all_.fail_counters[key] += 1
        if all_.fail_counters[key] <= int(n):
            return web.Response(status=503, text="injected 503\n")
    if "x-test-status" in h:
        return web.Response(status=int(h["x-test-status"]), text="as asked\n")
    if request.path == "/echo":
        resp = web.StreamResponse(headers={"x-version": backend.name})
        await resp.prepare(request)
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            await resp.write(chunk)
        await resp.write_eof()
        record["body_len"] = total
        return resp
    if request.path == "/big":
        size = int(request.query.get("n", "0"))
        resp = web.StreamResponse(headers={"x-version": backend.name})
        if "cl" in request.query:
            resp.content_length = size
        await resp.prepare(request)
        block = b"x" * 65536
        sent = 0
        while sent < size:
            step = min(len(block), size - sent)
            await resp.write(block[:step])
            sent += step
            if "slow" in request.query:
                await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp
    payload = {
        "version": backend.name,
        **{k: record[k] for k in ("path", "method", "body_len")},
        "headers": record["headers"],
    }
    return web.Response(
        text=json.dumps(payload),
        content_type="application/json",
        headers={"x-version": backend.name, "x-upstream-header": "present"},
    )


async def _sink(backend: Backend, request: web.Request) -> web.StreamResponse:
    """``/sink``: count the body without keeping it (large bodies); the shadow pod reads
    slowly (16 KiB per 0.1 s) when the request has ``x-test-slow-shadow``. The record's
    ``body_len`` grows as bytes arrive; ``complete`` says whether the body ended."""
    record: dict[str, Any] = {
        "path": request.path_qs,
        "method": request.method,
        "headers": dict(request.headers),
        "body_len": 0,
        "host": request.host,
        "peer": "",
        "complete": False,
    }
    backend.requests.append(record)
    slow = backend.name == "shadow" and "x-test-slow-shadow" in request.headers
    try:
        while True:
            chunk = await request.content.read(16384 if slow else 1 << 20)
            if not chunk:
                break
            record["body_len"] += len(chunk)
            if slow:
                await asyncio.sleep(0.1)
    except Exception:  # the sender reset the stream (a dropped mirror): body incomplete
        return web.Response(status=400)
    record["complete"] = True
    return web.Response(text=str(record["body_len"]), headers={"x-version": backend.name})


async def _websocket(backend: Backend, request: web.Request) -> web.StreamResponse:
    """A WebSocket echo: each message comes back as ``<pod>:<message>``."""
    backend.requests.append(
        {
            "path": request.path_qs,
            "method": request.method,
            "headers": dict(request.headers),
            "body_len": 0,
            "host": request.host,
            "peer": "",
        }
    )
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(f"{backend.name}:{msg.data}")
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(backend.name.encode() + b":" + msg.data)
    return ws


async def start_backends() -> Backends:
    pods = {
        "v1": Backend("v1", V1),
        "v2": Backend("v2", V2),
        "v3": Backend("v3", V3),
        "shadow": Backend("shadow", SHADOW_IP),
    }
    all_ = Backends(pods=pods)
    for b in pods.values():
        app = web.Application(client_max_size=1 << 30)

        async def handle(request: web.Request, b: Backend = b) -> web.StreamResponse:
            return await _handler(b, all_, request)

        app.router.add_route("*", "/{tail:.*}", handle)
        b.runner = web.AppRunner(app, access_log=None)
        await b.runner.setup()
        await web.TCPSite(b.runner, b.ip, PORT).start()
    return all_


@dataclass
class WaypointMesh:
    ca: MeshCA
    node_a: NodeProxy
    node_b: NodeProxy
    waypoint: Waypoint  # in-process, or an unstarted one when the test runs the CLI
    backends: Backends
    tmp: Path

    def session(self, **kw: Any) -> ClientSession:
        """An HTTP client in the client pod (its connections leave from CLIENT_IP)."""
        return ClientSession(
            connector=TCPConnector(local_addr=(CLIENT_IP, 0), limit=kw.pop("limit", 100)),
            timeout=ClientTimeout(total=kw.pop("timeout", 30)),
            **kw,
        )

    def set_config(self, *docs: str) -> None:
        cfg = parse_objects([d for text in docs for d in yaml.safe_load_all(text)])
        self.waypoint.ctx.set_config(cfg)


def waypoint_settings() -> WaypointSettings:
    return WaypointSettings(
        name="waypoint",
        namespace="default",
        service_account="waypoint",
        workload_uid="waypoint",
        listen=((WAYPOINT_IP, 15008),),
        admin=None,
        access_log=False,
    )


@asynccontextmanager
async def waypoint_mesh(
    tmp: Path, *docs: str, config: dict[str, Any] | None = None, start_waypoint: bool = True
) -> AsyncIterator[WaypointMesh]:
    state = MeshState.from_config(parse_mesh_config(config or mesh_config()))
    ca = MeshCA.load_or_create(tmp / "ca")
    provider = LocalCAProvider(ca, ttl=timedelta(hours=24), clock=utcnow)
    outbound = ((REVIEWS_VIP, PORT), (SHADOW_VIP, PORT), (GRPC_VIP, GRPC_PORT), (DB_VIP, DB_PORT))
    node_a = NodeProxy(
        node_context(
            ProxySettings(
                node="node-a",
                node_ip="127.0.81.1",
                outbound_listen=outbound,
                drain_timeout=1.0,
                metrics_port=15920,
                admin_port=15900,
                readiness_port=15921,
            ),
            state,
            provider,
        )
    )
    node_b = NodeProxy(
        node_context(
            ProxySettings(
                node="node-b",
                node_ip="127.0.82.1",
                drain_timeout=1.0,
                metrics_port=15920,
                admin_port=15900,
                readiness_port=15921,
            ),
            state,
            provider,
        )
    )
    cfg = parse_objects([d for text in docs for d in yaml.safe_load_all(text)])
    wctx = build_context(waypoint_settings(), state, cfg, provider)
    backends = await start_backends()
    await node_a.start()
    await node_b.start()
    wp = Waypoint(wctx)
    if start_waypoint:
        await wp.start()
    try:
        yield WaypointMesh(
            ca=ca, node_a=node_a, node_b=node_b, waypoint=wp, backends=backends, tmp=tmp
        )
    finally:
        if start_waypoint:
            await wp.drain(1.0)
        await node_a.drain()
        await node_b.drain()
        for b in backends.pods.values():
            if b.runner is not None:
                await b.runner.cleanup()


def run(coro: Any, timeout: float = 120) -> Any:
    return helpers.run(coro, timeout)


# ---------------------------------------------------------------------------- HTTP/2 + gRPC


@dataclass
class H2Result:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)
    reset: int | None = None


class H2Client:
    """A small prior-knowledge HTTP/2 client (the h2 library) from the client pod."""

    def __init__(self) -> None:
        import h2.config
        import h2.connection

        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.results: dict[int, H2Result] = {}
        self.done: dict[int, asyncio.Future[H2Result]] = {}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    async def connect(self, host: str, port: int) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            host, port, local_addr=(CLIENT_IP, 0)
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(1 << 24)
        self._flush()
        self.task = asyncio.get_running_loop().create_task(self._read())

    def _flush(self) -> None:
        assert self.writer is not None
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    async def _read(self) -> None:
        import h2.events

        assert self.reader is not None
        while data := await self.reader.read(65536):
            for ev in self.conn.receive_data(data):
                sid = getattr(ev, "stream_id", None)
                res = self.results.get(sid) if sid is not None else None
                if res is None:
                    continue
                if isinstance(ev, h2.events.ResponseReceived):
                    res.headers = dict(ev.headers)  # type: ignore[arg-type]
                    res.status = int(res.headers[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    res.body += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.TrailersReceived):
                    res.trailers = dict(ev.headers)  # type: ignore[arg-type]
                elif isinstance(ev, h2.events.StreamEnded):
                    self.done[ev.stream_id].set_result(res)
                elif isinstance(ev, h2.events.StreamReset):
                    res.reset = int(ev.error_code)
                    self.done[ev.stream_id].set_result(res)
            self._flush()
        for fut in self.done.values():
            if not fut.done():
                fut.set_exception(ConnectionResetError("connection closed"))

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        authority: str = f"reviews:{PORT}",
    ) -> H2Result:
        sid = self.conn.get_next_available_stream_id()
        self.results[sid] = H2Result()
        self.done[sid] = asyncio.get_running_loop().create_future()
        block = [
            (":method", method),
            (":scheme", "http"),
            (":authority", authority),
            (":path", path),
            *(headers or []),
        ]
        self.conn.send_headers(sid, block, end_stream=not body)
        self._flush()
        view = body
        while view:
            window = min(
                self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                await asyncio.sleep(0.005)
                continue
            self.conn.send_data(sid, view[:window], end_stream=len(view) <= window)
            view = view[window:]
            self._flush()
            assert self.writer is not None
            await self.writer.drain()
        return await self.done[sid]

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.task is not None:
            self.task.cancel()


def grpc_frame(payload: bytes) -> bytes:
    """gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


async def start_grpc_backend() -> Any:
    """A real grpcio server (an independent HTTP/2 implementation): /echo.Echo/Say answers
    ``<version>:<request>``; /echo.Echo/Fail aborts with UNAVAILABLE."""
    import grpc

    async def say(request: bytes, context: Any) -> bytes:
        await context.send_initial_metadata((("x-version", "grpc-v1"),))
        return b"grpc-v1:" + request

    async def fail(request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "asked to fail")
        return b""

    async def many(request: bytes, context: Any) -> Any:
        for i in range(int(request or b"3")):
            yield f"msg-{i}".encode()

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Many": grpc.unary_stream_rpc_method_handler(many),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{GRPC_IP}:{GRPC_PORT}")
    await server.start()
    return server
