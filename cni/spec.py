"""Pure CNI logic: environment and configuration parsing, result conversion, spec errors.

Owns everything the `ambient-cni` plugin decides without I/O, following the CNI specification
1.0.0 (github.com/containernetworking/cni SPEC.md) and its 0.3.x/0.4.0 predecessors:
- "Parameters": CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS, CNI_PATH.
  CNI_NETNS may be empty for DEL (the netns may already be gone); it is required otherwise.
- "Section 1: Network configuration format": cniVersion, name, type; a chained plugin gets the
  previous plugin's result in ``prevResult``.
- "Section 4: Plugin delegation / chaining": a chained plugin outputs the prevResult it was given,
  in the configuration's cniVersion.
- "Section 5: Result types": 1.0.0 dropped ``ips[].version`` (0.3.x/0.4.0 require it).
- "Error" and "Well-known error codes" (see cni.errors).
- "Version": CHECK exists since 0.4.0; with a 0.3.x config it is an incompatible-version error.

Invariants:
- `convert_result` never changes anything but the version-dependent fields (passthrough).
- Every rejected input raises a `CniError` subclass whose `code` is the spec's code for it.
- Bounded work on hostile input: the configuration is at most `MAX_CONFIG_BYTES` (the plugin
  reads no more) and nests at most `MAX_DEPTH` arrays/objects, checked by a linear scan BEFORE
  the JSON parser runs (Python's parser recurses: deep nesting is a RecursionError otherwise).
  Both are DecodingFailure (6). A real network configuration with its prevResult is a few KiB
  and nests about 4 deep.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cni.errors import (
    CniError,
    DecodingFailure,
    IncompatibleVersion,
    InvalidEnvironment,
    InvalidNetworkConfig,
)

SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
"""Config versions we accept. 0.1.0/0.2.0 results have another shape (ip4/ip6) and are refused."""
LATEST_VERSION = "1.0.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")
DEFAULT_AGENT_SOCKET = "/run/ambient/cni.sock"
DEFAULT_TIMEOUT = 10.0
MAX_CONFIG_BYTES = 1 << 20
"""Largest configuration read from stdin (1 MiB)."""
MAX_DEPTH = 64
"""Deepest nesting of JSON arrays/objects accepted."""


def version_tuple(version: str) -> tuple[int, int, int]:
    """'0.4.0' -> (0, 4, 0); raises IncompatibleVersion if it is not a semantic version."""
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise IncompatibleVersion(f"cniVersion {version!r} is not a version number")
    return int(parts[0]), int(parts[1]), int(parts[2])


@dataclass(frozen=True, slots=True, kw_only=True)
class CniEnv:
    """The CNI_* parameters of one invocation."""

    command: str
    """ADD, DEL, CHECK or VERSION."""
    container_id: str = ""
    """CNI_CONTAINERID: the runtime's unique id of the container (sandbox)."""
    netns: str = ""
    """CNI_NETNS: path of the container's network namespace (may be empty for DEL)."""
    ifname: str = ""
    """CNI_IFNAME: interface name inside the container."""
    args: tuple[tuple[str, str], ...] = ()
    """CNI_ARGS as ordered (key, value) pairs."""
    path: str = ""
    """CNI_PATH: where the runtime found plugins (unused: we delegate to nobody)."""

    def arg(self, key: str, default: str = "") -> str:
        for k, v in self.args:
            if k == key:
                return v
        return default


def parse_cni_args(text: str) -> tuple[tuple[str, str], ...]:
    """CNI_ARGS: ``KEY=VALUE`` pairs separated by ';' (spec "Parameters"). Empty is fine."""
    pairs: list[tuple[str, str]] = []
    for item in text.split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidEnvironment(
                "CNI_ARGS is malformed", f"expected KEY=VALUE pairs separated by ';', got {item!r}"
            )
        pairs.append((key, value))
    return tuple(pairs)


def parse_env(environ: Mapping[str, str]) -> CniEnv:
    """Validate the CNI_* variables for the command; names every missing/invalid variable."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise InvalidEnvironment(
            "CNI_COMMAND is missing or invalid",
            f"CNI_COMMAND={command!r}; expected one of {', '.join(COMMANDS)}",
        )
    if command == "VERSION":
        return CniEnv(command=command)
    required = ["CNI_CONTAINERID", "CNI_IFNAME"]
    if command != "DEL":
        required.append("CNI_NETNS")
    missing = [name for name in required if not environ.get(name)]
    if missing:
        raise InvalidEnvironment(
            f"missing required environment variables: {', '.join(missing)}",
            f"{command} needs {', '.join(required)}",
        )
    return CniEnv(
        command=command,
        container_id=environ["CNI_CONTAINERID"],
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ["CNI_IFNAME"],
        args=parse_cni_args(environ.get("CNI_ARGS", "")),
        path=environ.get("CNI_PATH", ""),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class NetConf:
    """Our plugin's network configuration (one entry of a conflist, as the runtime gives it)."""

    cni_version: str
    name: str
    type: str
    agent_socket: str = DEFAULT_AGENT_SOCKET
    """Unix socket of the node agent (key ``agentSocket``)."""
    timeout: float = DEFAULT_TIMEOUT
    """Seconds to wait for the agent (key ``agentTimeout``)."""
    default_namespace: str = "default"
    """Namespace for runtimes that send no K8S_POD_NAMESPACE (podman sends only the name)."""
    prev_result: Mapping[str, Any] | None = None
    """The previous plugin's result, as given (None if the runtime gave none)."""
    raw: Mapping[str, Any] = field(default_factory=dict)
    """The whole decoded configuration."""


def peek_version(data: bytes) -> str:
    """Best effort cniVersion of the input, for shaping an error; LATEST if unknown."""
    try:
        obj = decode_config(data)
    except CniError:
        return LATEST_VERSION
    version = obj.get("cniVersion")
    return version if isinstance(version, str) and version in SUPPORTED_VERSIONS else LATEST_VERSION


def nesting_depth(data: bytes, limit: int) -> int:
    """The deepest nesting of JSON arrays/objects in `data`, counting up to `limit` + 1 (the
    scan stops there). Brackets inside strings do not count. Linear, no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def decode_config(data: bytes) -> dict[str, Any]:
    """stdin -> JSON object, or DecodingFailure (6) (see the bounds in the module doc)."""
    if len(data) > MAX_CONFIG_BYTES:
        raise DecodingFailure(
            "network configuration too large",
            f"more than {MAX_CONFIG_BYTES} bytes on stdin",
        )
    if nesting_depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise DecodingFailure(
            "network configuration nested too deeply",
            f"more than {MAX_DEPTH} levels of arrays/objects",
        )
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise DecodingFailure("failed to decode network configuration", str(err)) from err
    if not isinstance(obj, dict):
        raise DecodingFailure(
            "failed to decode network configuration", "the configuration is not a JSON object"
        )
    return obj


def check_version(version: object) -> str:
    if not isinstance(version, str) or not version:
        raise InvalidNetworkConfig("cniVersion is missing", "the configuration needs cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise IncompatibleVersion(
            f"incompatible CNI version {version}",
            f"plugin supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    return version


def parse_netconf(data: bytes) -> NetConf:
    """Decode and validate our configuration (errors 6, 1, 7 in that order of checking)."""
    obj = decode_config(data)
    version = check_version(obj.get("cniVersion"))
    for key in ("name", "type"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise InvalidNetworkConfig(f"{key} is missing", f"the configuration needs {key!r}")
    socket_path = obj.get("agentSocket", DEFAULT_AGENT_SOCKET)
    if not isinstance(socket_path, str) or not socket_path.startswith("/"):
        raise InvalidNetworkConfig("agentSocket must be an absolute path", repr(socket_path))
    timeout = obj.get("agentTimeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise InvalidNetworkConfig("agentTimeout must be a positive number", repr(timeout))
    default_ns = obj.get("defaultNamespace", "default")
    if not isinstance(default_ns, str) or not default_ns:
        raise InvalidNetworkConfig("defaultNamespace must be a non-empty string", repr(default_ns))
    prev = obj.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise InvalidNetworkConfig("prevResult must be an object", repr(prev)[:200])
    if prev is not None:
        validate_result(prev)
    return NetConf(
        cni_version=version,
        name=obj["name"],
        type=obj["type"],
        agent_socket=socket_path,
        timeout=float(timeout),
        default_namespace=default_ns,
        prev_result=prev,
        raw=obj,
    )


def validate_result(result: Mapping[str, Any]) -> None:
    """Check the parts of a result we read or rewrite (interfaces, ips)."""
    interfaces = result.get("interfaces", [])
    if not isinstance(interfaces, list) or not all(isinstance(i, dict) for i in interfaces):
        raise InvalidNetworkConfig("prevResult.interfaces must be a list of objects")
    ips = result.get("ips", [])
    if not isinstance(ips, list) or not all(isinstance(i, dict) for i in ips):
        raise InvalidNetworkConfig("prevResult.ips must be a list of objects")
    for n, entry in enumerate(ips):
        address = entry.get("address")
        try:
            ipaddress.ip_interface(address)
        except ValueError as err:
            raise InvalidNetworkConfig(
                f"prevResult.ips[{n}].address is not a CIDR address", repr(address)
            ) from err


def convert_result(result: Mapping[str, Any], to_version: str) -> dict[str, Any]:
    """Re-shape a result for `to_version` (spec "Result types"); everything else passes through.

    0.3.x/0.4.0 -> 1.0.0 drops ``ips[].version``; 1.0.0 -> 0.3.x/0.4.0 adds it from the address
    family. The top-level ``cniVersion`` is set to `to_version`.
    """
    out = dict(result)
    out["cniVersion"] = to_version
    if "ips" in out:
        ips: list[dict[str, Any]] = []
        for entry in out["ips"]:
            e = dict(entry)
            if version_tuple(to_version) >= (1, 0, 0):
                e.pop("version", None)
            elif "version" not in e:
                e["version"] = str(ipaddress.ip_interface(e["address"]).version)
            ips.append(e)
        out["ips"] = ips
    return out


def empty_result(version: str) -> dict[str, Any]:
    """What a chained plugin outputs when the runtime gave no prevResult."""
    return {"cniVersion": version, "interfaces": [], "ips": [], "routes": [], "dns": {}}


def pod_ips(result: Mapping[str, Any]) -> tuple[str, ...]:
    """The pod's IPs (without prefix length) from a result, in order."""
    return tuple(str(ipaddress.ip_interface(e["address"]).ip) for e in result.get("ips", []))


def host_interfaces(result: Mapping[str, Any]) -> tuple[str, ...]:
    """Names of the result's interfaces without ``sandbox`` (host side), in result order.

    The bridge plugin reports [bridge, host veth, container iface]; ptp reports [host veth,
    container iface]. The node agent picks the veth among these (it can ask the kernel).
    """
    return tuple(
        str(i["name"])
        for i in result.get("interfaces", [])
        if not i.get("sandbox") and isinstance(i.get("name"), str)
    )


def guess_host_veth(result: Mapping[str, Any]) -> str:
    """The host-side veth: the last host interface listed before the first sandbox one."""
    last = ""
    for i in result.get("interfaces", []):
        if i.get("sandbox"):
            if last:
                return last
            continue
        last = str(i.get("name", ""))
    return last


def error_object(err: CniError, version: str) -> dict[str, Any]:
    """The spec's error JSON ({cniVersion, code, msg, details})."""
    obj: dict[str, Any] = {"cniVersion": version, "code": err.code, "msg": err.msg}
    if err.details:
        obj["details"] = err.details
    return obj


def version_object(data: bytes) -> dict[str, Any]:
    """VERSION's answer (spec "VERSION"): the input's cniVersion (if ours) and what we support."""
    return {"cniVersion": peek_version(data), "supportedVersions": list(SUPPORTED_VERSIONS)}


@dataclass(frozen=True, slots=True, kw_only=True)
class PodRef:
    """Who the container is, from CNI_ARGS (K8S_POD_*); runtimes without Kubernetes may omit
    them (then name/namespace are empty and the uid falls back to the container id)."""

    uid: str
    namespace: str
    name: str


MAX_UID = 63
"""The capture map stores a uid of at most 63 bytes (a Kubernetes UID is 36)."""


def pod_ref(env: CniEnv, default_namespace: str = "default") -> PodRef:
    # Without K8S_POD_UID (podman) the container id stands in; it is 64 hex characters, and a
    # 63-character prefix is still unique, and the same for ADD, CHECK and DEL.
    return PodRef(
        uid=(env.arg("K8S_POD_UID") or env.container_id)[:MAX_UID],
        namespace=env.arg("K8S_POD_NAMESPACE") or default_namespace,
        name=env.arg("K8S_POD_NAME"),
    )


def require_check_version(version: str) -> None:
    """CHECK was added in 0.4.0 (spec "CHECK"); libcni refuses it for older configs."""
    if version_tuple(version) < (0, 4, 0):
        raise IncompatibleVersion(
            f"config version {version} does not allow CHECK", "CHECK needs cniVersion >= 0.4.0"
        )
