"""`host:port` text -> (host, port): the one parser of addresses every process reads.

Owns: `split_host_port` (the syntax: ``host:port`` or ``[v6]:port``), `parse_authority` (an HBONE
CONNECT ``:authority``: an IP literal and a port, RFC 9113 §8.5; the node proxy and the waypoint
both read it) and `listen_address` (a ``--*-listen``-style flag's value).

Invariants: one contract, every parser raises and none returns None: `split_host_port` a
ValueError, `parse_authority` `BadRequest` (HTTP 400 on the wire), `listen_address` a
`ConfigError` naming the flag. The host comes back without brackets; the port is an int in
0..65535 (a CONNECT target must not be port 0). Pure.
"""

from __future__ import annotations

from meshcore.errors import BadRequest, ConfigError
from meshcore.state import parse_address

MAX_PORT = 65535


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port). Raises ValueError."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > MAX_PORT:
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def parse_authority(authority: str) -> tuple[str, int]:
    """An HBONE CONNECT ``:authority``: ``ip:port`` or ``[v6]:port`` (Istio's HBONE names the
    destination by address, docs/reference/ambient-facts.md). Raises BadRequest (400)."""
    try:
        host, port = split_host_port(authority)
        parse_address(host)  # memoised for the addresses the mesh knows, only those
    except ValueError:
        raise BadRequest(f"bad :authority {authority!r}: want ip:port") from None
    if port == 0:
        raise BadRequest(f"bad :authority {authority!r}: port 0")
    return host, port


def listen_address(text: str, flag: str) -> tuple[str, int]:
    """A flag's ``host:port`` (port 0: the kernel picks). Raises ConfigError naming `flag`."""
    try:
        return split_host_port(text)
    except ValueError as err:
        raise ConfigError(flag, str(err)) from None
