"""gRPC over HTTP/2, the client's wire rules (sans-I/O): request headers, length-prefixed
messages, and a call's final status (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md).

Owns: the request header block of a call (`request_headers`: POST, ``te: trailers``,
``content-type: application/grpc``, ``grpc-timeout``, the caller's metadata), message framing
(`frame_message`), `MessageReader` (DATA bytes -> whole messages, whatever the DATA frame
boundaries), `ResponseReader` (one call's response: headers, messages, trailers or
trailers-only, RST_STREAM -> a `Status`), the status code names (google.rpc.Code) and
`GrpcError`, the one error a failed call raises. The asyncio edge is `meshcore.grpcclient`.

Invariants (the peer may be hostile):
- A message is refused before any of its body is buffered when its 5-octet prefix announces
  more than `max_message` octets (RESOURCE_EXHAUSTED, as grpc's own clients): a reader holds at
  most one partial message of at most `max_message` octets.
- We never ask for compression (no ``grpc-accept-encoding``), so a message with the
  Compressed-Flag set, or a flag other than 0/1, is an INTERNAL error, never decoded.
- A call ends with exactly one `Status`: from the trailers (``grpc-status``, ``grpc-message``
  percent-decoded), from a trailers-only response, synthesized from a non-200 ``:status`` or a
  content-type that is not ``application/grpc`` (the spec's "broken deployments"), from an
  RST_STREAM (the spec's mapping table), or INTERNAL when the stream ended without
  ``grpc-status`` or inside a message. OK only with a valid ``grpc-status: 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote

from meshcore.errors import MeshError
from meshcore.hbone.frames import ErrorCode

# google.rpc.Code (https://github.com/googleapis/googleapis/blob/master/google/rpc/code.proto).
CODE_NAMES: tuple[str, ...] = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
OK, CANCELLED, UNKNOWN = 0, 1, 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

PREFIX = 5
"""Compressed-Flag (1 octet) and Message-Length (4 octets, big endian)."""
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
"""The largest response message accepted by default (a full Address set of 10,000 workloads
is ~3 MiB, bench/README.md "Session 8: own gRPC client")."""
USER_AGENT = "ambient-mesh-grpc/1"


def code_name(code: int) -> str:
    return CODE_NAMES[code] if 0 <= code < len(CODE_NAMES) else f"CODE_{code}"


class GrpcError(MeshError):
    """A call that ended with a status other than OK (the server's or one we synthesized)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code_name(code)}: {message}")
        self.code = code
        self.details = message

    @property
    def code_name(self) -> str:
        return code_name(self.code)


@dataclass(frozen=True, slots=True, kw_only=True)
class Status:
    code: int
    message: str = ""

    def error(self) -> GrpcError | None:
        return None if self.code == OK else GrpcError(self.code, self.message)


def grpc_timeout(seconds: float) -> str:
    """The ``grpc-timeout`` value: at most 8 digits and a unit (the spec's TimeoutValue);
    milliseconds rounded up, coarser units only when the value would not fit."""
    value = max(1, math.ceil(seconds * 1000))
    for unit, per in (("m", 1), ("S", 1000), ("M", 60_000), ("H", 3_600_000)):
        count = math.ceil(value / per)
        if count <= 99_999_999:
            return f"{count}{unit}"
    return "99999999H"


def request_headers(
    *,
    path: str,
    authority: str,
    scheme: str,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float | None = None,
) -> list[tuple[str, str]]:
    """A call's Request-Headers: pseudo-headers, then ``te``, the timeout, the content-type
    and the custom metadata (names lowercase; ``grpc-`` names are the protocol's)."""
    block = [
        (":method", "POST"),
        (":scheme", scheme),
        (":path", path),
        (":authority", authority),
        ("te", "trailers"),
    ]
    if timeout is not None:
        block.append(("grpc-timeout", grpc_timeout(timeout)))
    block += [("content-type", "application/grpc"), ("user-agent", USER_AGENT)]
    for name, value in metadata:
        lowered = name.lower()
        if lowered.startswith((":", "grpc-")) or lowered in ("te", "content-type"):
            raise ValueError(f"metadata {name!r} is reserved by the protocol")
        if not _ascii_value(value):
            # The spec's ASCII-Value is 1*(%x20-%x7E); CR, LF or NUL would also be a malformed
            # field (RFC 9113 §8.2.1) the peer resets. Refused here, naming the entry.
            raise GrpcError(
                INTERNAL, f"metadata {name!r}: value holds a character outside %x20-%x7E"
            )
        block.append((lowered, value))
    return block


def _ascii_value(value: str) -> bool:
    return value.isascii() and value.isprintable()


def is_grpc_content_type(value: str) -> bool:
    """The spec's Content-Type: ``application/grpc``, optionally ``+`` a message format
    (``+proto``) or ``;`` parameters; never ``application/grpc-web`` or ``application/grpcx``.
    Media types compare case-insensitively (RFC 9110 §8.3.1)."""
    lowered = value.lower()
    return lowered == "application/grpc" or lowered.startswith(
        ("application/grpc+", "application/grpc;")
    )


def frame_message(message: bytes) -> bytes:
    """One Length-Prefixed-Message, uncompressed."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


class MessageReader:
    """DATA payloads -> whole messages; bounded by `max_message` (see the module invariants)."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._need = 0
        """Length of the message whose prefix was read (body pending), else 0 with no prefix."""
        self._in_body = False

    @property
    def partial(self) -> bool:
        """Octets of an unfinished message are buffered."""
        return bool(self._buf) or self._in_body

    def feed(self, data: bytes) -> list[bytes]:
        """The messages `data` completes (zero or more). Raises GrpcError on a bad prefix."""
        buf = self._buf
        buf += data
        out: list[bytes] = []
        view = memoryview(buf)  # a message copied out once (a bytearray slice would copy twice)
        try:
            pos = self._split(view, out)
        finally:
            view.release()  # before the bytearray is resized
        del buf[:pos]
        return out

    def _split(self, buf: memoryview, out: list[bytes]) -> int:
        """Whole messages of `buf` appended to `out`; returns the octets consumed."""
        pos = 0
        while True:
            if not self._in_body:
                if len(buf) - pos < PREFIX:
                    break
                flag = buf[pos]
                length = int.from_bytes(buf[pos + 1 : pos + PREFIX], "big")
                if flag == 1:
                    raise GrpcError(INTERNAL, "compressed message, but no compression was asked")
                if flag != 0:
                    raise GrpcError(INTERNAL, f"invalid Compressed-Flag {flag}")
                if length > self.max_message:
                    raise GrpcError(
                        RESOURCE_EXHAUSTED,
                        f"message of {length} octets is larger than the limit "
                        f"({self.max_message} octets)",
                    )
                pos += PREFIX
                self._need, self._in_body = length, True
            if len(buf) - pos < self._need:
                break
            out.append(bytes(buf[pos : pos + self._need]))
            pos += self._need
            self._need, self._in_body = 0, False
        return pos


# The spec's RST_STREAM -> status mapping (CANCEL from a server: CANCELLED).
_RESET_CODES = {
    int(ErrorCode.REFUSED_STREAM): UNAVAILABLE,
    int(ErrorCode.CANCEL): CANCELLED,
    int(ErrorCode.ENHANCE_YOUR_CALM): RESOURCE_EXHAUSTED,
    int(ErrorCode.INADEQUATE_SECURITY): PERMISSION_DENIED,
}
# gRPC's HTTP status -> status mapping for a non-200 response (doc/http-grpc-status-mapping.md).
_HTTP_CODES = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}


def percent_decoded(text: str) -> str:
    """``grpc-message``: percent-encoded UTF-8 (the spec's Status-Message); a broken escape is
    left as it is and invalid UTF-8 replaced, as the spec asks of a receiver."""
    return unquote(text, errors="replace") if "%" in text else text


def _field(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k == name), None)


def status_of(headers: Sequence[tuple[str, str]]) -> Status | None:
    """The status a trailer section (or trailers-only response) carries; None without
    ``grpc-status``. A value that is not a decimal 0..16 without leading zeros is UNKNOWN."""
    raw = _field(headers, "grpc-status")
    if raw is None:
        return None
    message = percent_decoded(_field(headers, "grpc-message") or "")
    valid = raw.isascii() and raw.isdigit() and (raw == "0" or not raw.startswith("0"))
    if not valid or int(raw) >= len(CODE_NAMES):
        return Status(code=UNKNOWN, message=f"invalid grpc-status {raw!r}: {message}")
    return Status(code=int(raw), message=message)


class ResponseReader:
    """One call's response, from the events of its HTTP/2 stream to messages and a `Status`.

    Each method returns the messages completed and, once the call is over, its status
    (`status` is then set and every later event is ignored)."""

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.messages = MessageReader(max_message)
        self.status: Status | None = None
        self._headers_seen = False
        self._early_status: Status | None = None
        """``grpc-status`` in the response headers: the call's status if they end the stream
        (trailers-only)."""

    def _end(self, status: Status) -> Status:
        if self.status is None:
            self.status = status
        return self.status

    def headers(self, http_status: int, headers: Sequence[tuple[str, str]]) -> Status | None:
        """The Response-Headers (or a Trailers-Only block: `ended` follows)."""
        if self.status is not None:
            return self.status
        self._headers_seen = True
        if http_status != 200:
            code = _HTTP_CODES.get(http_status, UNKNOWN)
            return self._end(Status(code=code, message=f"HTTP status {http_status}"))
        ctype = _field(headers, "content-type") or ""
        if not is_grpc_content_type(ctype):
            # Not gRPC (the spec's Response-Headers and Trailers-Only both carry Content-Type):
            # UNKNOWN, as grpc-go treats it, never OK. A grpc-status the server sent anyway is
            # kept in the message so the operator sees what it said.
            said = status_of(headers)
            told = f"; it said {code_name(said.code)} {said.message}".rstrip() if said else ""
            message = f"content-type {ctype!r}: not gRPC{told}"
            return self._end(Status(code=UNKNOWN, message=message))
        self._early_status = status_of(headers)
        return None

    def data(self, data: bytes) -> list[bytes]:
        """DATA payload octets; raises GrpcError (and ends the call) on a bad message prefix."""
        if self.status is not None:
            return []
        if self._early_status is not None:
            # grpc-status in the headers was a trailers-only response; DATA after it is not gRPC.
            err = GrpcError(INTERNAL, "DATA after a trailers-only response")
            self._end(Status(code=err.code, message=err.details))
            raise err
        try:
            return self.messages.feed(data)
        except GrpcError as err:
            self._end(Status(code=err.code, message=err.details))
            raise

    def trailers(self, headers: Sequence[tuple[str, str]]) -> Status:
        status = status_of(headers)
        if status is None:
            status = Status(code=INTERNAL, message="trailers without grpc-status")
        elif self.messages.partial:
            status = Status(code=INTERNAL, message="stream ended inside a message")
        return self._end(status)

    def ended(self) -> Status:
        """END_STREAM: the status the trailers (or trailers-only headers) gave, else an error."""
        if self.status is not None:
            return self.status
        if not self._headers_seen:
            return self._end(Status(code=INTERNAL, message="stream ended without headers"))
        if self._early_status is not None:
            return self._end(self._early_status)
        return self._end(Status(code=INTERNAL, message="stream ended without grpc-status"))

    def reset(self, error_code: int, *, remote: bool, why: str = "") -> Status:
        """RST_STREAM (ours or the peer's); `why`: the cause when known (the server's GOAWAY)."""
        code = _RESET_CODES.get(error_code, INTERNAL) if remote else INTERNAL
        who = "peer" if remote else "us (malformed response)"
        message = f"stream reset by {who}, code {error_code}" + (f" ({why})" if why else "")
        return self._end(Status(code=code, message=message))

    def lost(self, reason: str) -> Status:
        """The connection is gone: UNAVAILABLE (the spec's "connection failure")."""
        return self._end(Status(code=UNAVAILABLE, message=reason))
