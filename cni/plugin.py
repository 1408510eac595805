"""`ambient-cni`: the chained CNI plugin that asks the node agent to enroll each pod.

Owns the process edge of the CNI protocol (spec 1.0.0 "Section 2: Execution Protocol"):
read CNI_* from the environment and the configuration from stdin, act, write the result or the
error JSON on stdout, exit 0 or 1. Decisions are in cni.spec (pure); the agent decides whether
the pod is ambient (it owns the labels) and enrolls it.

- ADD: requires prevResult (we are chained after the primary plugin, which assigned the IPs);
  sends {uid, namespace, name, netns, ifname, ips, host veth} to the agent; "enrolled" or
  "not-ambient" -> print prevResult (converted to the config's cniVersion) and exit 0; any
  agent failure, including an unreachable agent, FAILS the ADD so no ambient pod starts
  un-captured.
- DEL: light and idempotent: asks the agent to unenroll, and succeeds if the agent is gone.
- CHECK (>= 0.4.0): the agent confirms the pod is enrolled if it should be.
- VERSION: the versions we support.
Invariant: exactly one JSON document on stdout per invocation (or none for a successful DEL or
CHECK), and the exit status is non-zero iff that document is an error. At most
`spec.MAX_CONFIG_BYTES` + 1 bytes are read from stdin. An unexpected exception (a bug) is still
an error JSON (code 999, "internal error") and exit 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import IO, Any

from cni import protocol, spec
from cni.errors import CniError, InvalidNetworkConfig, IOFailure


def _request(env: spec.CniEnv, conf: spec.NetConf, op: str) -> dict[str, Any]:
    pod = spec.pod_ref(env, conf.default_namespace)
    req: dict[str, Any] = {
        "op": op,
        "uid": pod.uid,
        "namespace": pod.namespace,
        "name": pod.name,
        "containerId": env.container_id,
        "netns": env.netns,
        "ifname": env.ifname,
    }
    if conf.prev_result is not None:
        req["ips"] = list(spec.pod_ips(conf.prev_result))
        req["hostIfname"] = spec.guess_host_veth(conf.prev_result)
        req["hostInterfaces"] = list(spec.host_interfaces(conf.prev_result))
    return req


def handle(env: spec.CniEnv, conf: spec.NetConf) -> dict[str, Any] | None:
    """Run one command; returns what to print (None for nothing) or raises CniError."""
    if env.command == "ADD":
        if conf.prev_result is None or not spec.pod_ips(conf.prev_result):
            raise InvalidNetworkConfig(
                "ambient-cni must be chained after a plugin that assigns IPs",
                "ADD received no prevResult with ips",
            )
        protocol.call(conf.agent_socket, _request(env, conf, "enroll"), timeout=conf.timeout)
        return spec.convert_result(conf.prev_result, conf.cni_version)
    if env.command == "DEL":
        try:
            protocol.call(conf.agent_socket, _request(env, conf, "unenroll"), timeout=conf.timeout)
        except CniError as err:
            # DEL must succeed when there is nothing left to clean (spec "DEL"): an agent that
            # is gone has nothing enrolled for us; it reconciles leftovers when it comes back.
            if err.code not in (100, 11):
                raise
        return None
    if env.command == "CHECK":
        spec.require_check_version(conf.cni_version)
        if conf.prev_result is None:
            raise InvalidNetworkConfig("CHECK needs prevResult", "the runtime must pass it")
        protocol.call(conf.agent_socket, _request(env, conf, "check"), timeout=conf.timeout)
        return None
    raise InvalidNetworkConfig(f"unsupported command {env.command}")  # parse_env prevents it


def run(environ: Mapping[str, str], stdin: IO[bytes], stdout: IO[str]) -> int:
    """The whole plugin, with its I/O injected (tests call this directly)."""
    data = b""
    version = spec.LATEST_VERSION
    try:
        try:
            # One byte more than allowed, so decode_config sees "too large" (bounded memory).
            data = stdin.read(spec.MAX_CONFIG_BYTES + 1)
        except OSError as err:
            raise IOFailure("failed to read network configuration", str(err)) from err
        version = spec.peek_version(data)
        env = spec.parse_env(environ)
        if env.command == "VERSION":
            stdout.write(json.dumps(spec.version_object(data)) + "\n")
            return 0
        conf = spec.parse_netconf(data)
        result = handle(env, conf)
    except CniError as err:
        stdout.write(json.dumps(spec.error_object(err, version)) + "\n")
        return 1
    except Exception as exc:  # a bug; the runtime still gets the spec's error shape
        internal = CniError("internal error", f"{type(exc).__name__}: {exc}"[:1000])
        stdout.write(json.dumps(spec.error_object(internal, version)) + "\n")
        return 1
    if result is not None:
        stdout.write(json.dumps(result) + "\n")
    return 0


def main() -> int:
    return run(os.environ, sys.stdin.buffer, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
