"""The node agent's local API: JSON lines over a unix stream socket, and its blocking client.

Owns the request/answer shapes shared by the plugin (`ambient-cni`), the agent and the lab CLI.
One request per connection: the client writes one JSON object and a newline, the agent answers
one JSON object and a newline, then closes.

Requests (``op`` selects):
- ``enroll``   {uid, namespace, name, containerId, netns, ifname, ips, hostIfname, hostInterfaces}
               -> {ok, result: "enrolled" | "not-ambient"}
- ``unenroll`` {uid, containerId} -> {ok, result: "unenrolled"}  (idempotent: unknown is fine)
- ``check``    {uid, containerId, ips} -> {ok, result: "enrolled" | "not-ambient"}
- ``status``   {} -> {ok, pods: [PodStatus...], node}
- ``sync``     {} -> {ok, changes: [...]}: re-read labels and reconcile now
Failures: {ok: false, code, msg, details}; `code` is a CNI error code (cni.errors), so the plugin
relays the agent's meaning without translating it.

Invariant: the client never raises anything but `CniError` subclasses; a missing/refused socket
is `AgentUnreachable` (100), a timeout `TryAgainLater` (11), garbage `AgentProtocolError` (103).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from typing import Any

from cni.errors import AgentProtocolError, AgentUnreachable, CniError, TryAgainLater, from_code

OPS = ("enroll", "unenroll", "check", "status", "sync")
MAX_LINE = 1 << 20


def encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as err:
        raise AgentProtocolError("agent protocol: not JSON", str(err)) from err
    if not isinstance(obj, dict):
        raise AgentProtocolError("agent protocol: not a JSON object")
    return obj


def ok(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def failure(err: CniError) -> dict[str, Any]:
    return {"ok": False, "code": err.code, "msg": err.msg, "details": err.details}


def raise_for(answer: Mapping[str, Any]) -> dict[str, Any]:
    """Return a successful answer, or raise the CniError it carries."""
    if answer.get("ok") is True:
        return dict(answer)
    code = answer.get("code")
    if not isinstance(code, int):
        raise AgentProtocolError("agent protocol: failure without a code", repr(answer)[:300])
    raise from_code(code, str(answer.get("msg", "")), str(answer.get("details", "")))


def call(path: str, request: Mapping[str, Any], *, timeout: float) -> dict[str, Any]:
    """One request to the agent at `path`; returns the successful answer or raises CniError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as err:
            raise AgentUnreachable(
                "node agent unreachable", f"cannot connect to {path}: {err.strerror}"
            ) from err
        except TimeoutError as err:
            raise TryAgainLater("node agent busy", f"connect to {path} timed out") from err
        except OSError as err:
            raise AgentUnreachable("node agent unreachable", f"{path}: {err}") from err
        data = bytearray()
        try:
            sock.sendall(encode(request))
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_LINE:
                    raise AgentProtocolError("agent protocol: answer too long")
        except TimeoutError as err:
            raise TryAgainLater(
                "node agent did not answer in time", f"{request.get('op')} on {path}"
            ) from err
        except OSError as err:
            raise AgentUnreachable("node agent connection failed", str(err)) from err
    finally:
        sock.close()
    if not data:
        raise AgentUnreachable("node agent closed the connection without answering", path)
    return raise_for(decode(bytes(data)))
