"""Protocol detection for waypoint tunnels, and the SNI of a TLS ClientHello.

Owns: `classify` (the first bytes of a tunnel -> ``http`` / ``tcp`` / undecided) and
`client_hello_sni` (the server name of a TLS ClientHello, RFC 8446 §4.1.2 + RFC 6066 §3).

Detection (the idea of Envoy's http_inspector, which Istio uses for ports without a declared
protocol): the HTTP/2 preface (RFC 9113 §3.4), or a request line's first token followed by a
space (RFC 9112 §3: ``method SP``; the method is any token here, so a malformed HTTP request
still reaches the HTTP parser and gets its 400) -> ``http``; anything else -> ``tcp``. Ports
declared HTTP/HTTP2/gRPC skip detection; a client that sends nothing is decided by the caller
(server-first protocols: TCP after a timeout). Routing a connection as TCP never widens access:
L7 policy fields are read with Istio's ztunnel rule there (an ALLOW rule using one matches
nothing, a DENY rule is enforced on its L4 attributes alone).

Invariants: pure; `classify` decides within `MAX_SNIFF` bytes; the ClientHello parser reads at
most one handshake message of at most `MAX_HELLO` bytes and never raises on bad input.
"""

from __future__ import annotations

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_METHOD = 32
MAX_SNIFF = MAX_METHOD + 1
MAX_HELLO = 16 * 1024
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def classify(first: bytes) -> str | None:
    """``http``, ``tcp``, or None: more bytes are needed."""
    if not first:
        return None
    if H2_PREFACE.startswith(first[: len(H2_PREFACE)]):
        return "http" if len(first) >= len(H2_PREFACE) else None
    for i, b in enumerate(first[:MAX_SNIFF]):
        if b == 0x20:
            return "http" if i > 0 else "tcp"
        if b not in _TCHAR:
            return "tcp"
    return None if len(first) < MAX_SNIFF else "tcp"


def client_hello_sni(data: bytes) -> str | bool | None:
    """The SNI host name of the ClientHello at the start of `data`; None: a complete
    ClientHello without SNI (or not TLS); False: more bytes are needed."""
    if len(data) < 5:
        return False
    if data[0] != 0x16 or data[1] != 0x03:  # handshake record, TLS 1.x legacy version
        return None
    # Collect the handshake message across records (a ClientHello may span several).
    msg = bytearray()
    pos = 0
    while True:
        if len(data) < pos + 5:
            return False
        if data[pos] != 0x16:
            return None
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > MAX_HELLO:
            return None
        if len(data) < pos + 5 + length:
            return False if pos + 5 + length <= MAX_HELLO + 5 * 4 else None
        msg += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(msg) >= 4:
            need = int.from_bytes(msg[1:4], "big") + 4
            if msg[0] != 0x01 or need > MAX_HELLO:
                return None
            if len(msg) >= need:
                return _sni(bytes(msg[4:need]))
        if pos > MAX_HELLO + 5 * 4:
            return None


def _sni(body: bytes) -> str | None:
    try:
        p = 2 + 32  # legacy_version, random
        p += 1 + body[p]  # session id
        p += 2 + int.from_bytes(body[p : p + 2], "big")  # cipher suites
        p += 1 + body[p]  # compression methods
        end = p + 2 + int.from_bytes(body[p : p + 2], "big")
        p += 2
        if end > len(body):
            return None
        while p + 4 <= end:
            etype = int.from_bytes(body[p : p + 2], "big")
            elen = int.from_bytes(body[p + 2 : p + 4], "big")
            ext = body[p + 4 : p + 4 + elen]
            p += 4 + elen
            if etype != 0:
                continue
            q = 2
            while q + 3 <= len(ext):
                ntype = ext[q]
                nlen = int.from_bytes(ext[q + 1 : q + 3], "big")
                name = ext[q + 3 : q + 3 + nlen]
                q += 3 + nlen
                if ntype == 0 and name and name.isascii():
                    text = name.decode().lower().rstrip(".")
                    return text if all(c.isalnum() or c in "-._" for c in text) else None
            return None
    except IndexError:
        return None
    return None
