"""Sans-I/O HTTP/1.1 message codec (RFC 9112) for a proxy: parse requests or responses from
bytes into events, and serialise heads and body framing.

Owns: `Http1Parser` (one direction of one connection: requests from a client, or responses from
a server), its events (`RequestHead`, `ResponseHead`, `Body`, `EndOfMessage`), the fast head
reader (`_field_lines` and the start-line patterns) and the encoders.

Invariants:
- Bodies are never reassembled: `Body` events carry the bytes as they arrive (bounded by what
  the caller fed), so a proxy streams a body of any size in constant memory.
- Message framing follows RFC 9112 §6.3 exactly; anything ambiguous is a `HttpParseError`
  (status 400 for requests, 502 for responses) instead of a guess, which closes the request
  smuggling holes a proxy would otherwise open: Transfer-Encoding together with Content-Length,
  several differing Content-Length values, a Transfer-Encoding other than a final "chunked",
  obs-fold (§5.2), whitespace before the colon (§5.1), bare LF line ends in the head.
- Header names are lower-cased (they are case-insensitive, RFC 9110 §5.1); order and repeats
  are kept. Field values and reason phrases with control characters other than HTAB (RFC 9110
  §5.5, RFC 9112 §4) are refused; at most `MAX_HEADERS` fields (431 past that, Envoy's
  default) in a head or a trailer section, at most `MAX_INTERIM_HEADS` 1xx heads before one
  final response; at most `MAX_EMPTY_LINES` empty lines before a start line (RFC 9112 §2.2
  asks to ignore at least one; past the bound the message is refused as malformed, so a peer
  cannot keep a connection busy on empty lines that never count against `MAX_HEAD`).
- A request line has an upper-case token method (RFC 9110 §9.1; Istio refuses other verbs
  with 400) and a visible-ASCII target (RFC 9112 §3.2); an HTTP/1.1 request has exactly one
  Host field line (RFC 9112 §3.2); a status code is exactly three digits (RFC 9112 §4).
  Numbers (Content-Length, chunk sizes) are ASCII digits only, with no surrounding whitespace
  in chunk sizes (RFC 9112 §7.1); list members (Transfer-Encoding, Connection, a Content-Length
  list) are trimmed of SP/HTAB only, never of other Unicode whitespace (U+00A0, U+0085).
- The fast head reader is the checked parser's rules written as one pattern per start line and
  one `findall` over the field lines (the regex engine's C; Python only builds the field
  tuples), and it only ever accepts: a head it does not match exactly (every line, `findall`'s
  count equal to the line count) is read again by the checked parser, line by line, which
  words every refusal (same status, same message). The Host, version, status and framing
  checks are one code for both (`_request_head`, `_response_head`).
  `tests/unit/test_http1_fast.py`, `test_http1_fast_response.py`: differential, both readers
  fed the same bytes. (Session 9: it replaced llhttp through httptools, which read heads only
  under the same discipline and cost more with the checks around it: bench/README.md,
  "Session 9: waypoint head path".)
- A hostile head costs time linear in its size, however it arrives: every pattern here runs
  in time linear in its input (no nested or adjacent quantifiers that can trade characters;
  possessive ``*+``/``++`` where two could: the checked parser's former lazy field pattern
  took ~12 s of CPU for one 60 KiB head before session 9), and the search for the end of a
  head, a chunk size line or a trailer line resumes where the previous read's stopped
  (`_scanned`), so a head trickled one byte per read is searched once, not once per byte
  (~1 s of CPU for 60 KiB before).
- The parser is reusable across keep-alive messages: after `EndOfMessage` it parses the next
  message from the bytes already buffered (pipelining is handled by the caller's one-at-a-time
  loop).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from meshcore.errors import MeshError
from meshcore.hbone.headerblock import MAX_INTERIM_HEADS as MAX_INTERIM_HEADS  # one bound, 502 here

MAX_HEAD = 60 * 1024
"""Largest request/response head accepted (Envoy's default max_request_headers_kb is 60)."""
MAX_HEADERS = 100
"""Most field lines in a head or a trailer section (Envoy's default max_headers_count)."""
MAX_EMPTY_LINES = 8
"""Most empty lines (CR LF) ignored before a start line (RFC 9112 §2.2: "SHOULD ignore at least
one empty line (CRLF) received prior to the request-line"; a client may send one after a
body); more is a malformed message (400, 502 for a response)."""
MAX_CHUNK_LINE = 4096

Headers = tuple[tuple[str, str], ...]

# RFC 9110 §5.6.2 token characters.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A method: a token without lower-case letters (Istio: a verb that is not upper case is a 400).
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Z]+")
# RFC 9110 §5.5: CTLs other than HTAB are not field-content.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 §4: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ), the same octets.
_BAD_REASON = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(rb"[0-9]{1,18}")
# RFC 9112 §4: status-code = 3DIGIT, exactly three.
_STATUS_CODE = re.compile(rb"[0-9]{3}")
_RESPONSE_VERSION = re.compile(rb"HTTP/1\.[0-9]")
# The fast head reader, over the head as latin-1 text (obs-text kept, RFC 9110 §5.5), every
# line ended by CR LF. A field line (RFC 9112 §5): token ":" OWS field-value CRLF, the value
# VCHAR / obs-text / SP / HTAB only (RFC 9110 §5.5: no other control character), its trailing
# OWS stripped after the match (a lazy value followed by OWS backtracks quadratically). It
# starts only right after a CR LF, so one match is one whole line.
_FIELD = re.compile(
    r"(?<=\r\n)([!#$%&'*+\-.^_`|~0-9A-Za-z]++):[ \t]*+([\t\x20-\x7e\x80-\xff]*+)\r\n"
)
# request-line = method SP request-target SP HTTP-version (RFC 9112 §3): an upper-case token
# method (Istio), a visible-ASCII target (§3.2), HTTP/1.1 or HTTP/1.0 (others: the checked
# parser's 505).
_REQUEST_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Z]++) ([\x21-\x7e]++) (HTTP/1\.[01])\r\n")
# status-line = HTTP-version SP status-code SP [ reason-phrase ] (RFC 9112 §4; the checked
# parser also takes a line that ends after the code).
_STATUS_LINE = re.compile(r"(HTTP/1\.[0-9]) ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*+))?\r\n")
# RFC 9112 §3.2: a request-target is visible ASCII.
_VISIBLE = re.compile(rb"[\x21-\x7e]+")
# RFC 9112 §7.1.1: chunk-size [ BWS ";" chunk-ext ] -- no whitespace unless an extension follows.
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:[ \t]*;[\x21-\x7e \t]*)?")
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
        "proxy-authenticate",
        "proxy-authorization",
    }
)


class HttpParseError(MeshError):
    """Malformed HTTP/1.1. `status` is what a proxy answers (400 from a client, 502 upstream)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Role(enum.Enum):
    REQUEST = "request"
    """Parse requests (the server side of a connection)."""
    RESPONSE = "response"
    """Parse responses (the client side)."""


class RequestHead(NamedTuple):
    """A request head (immutable; a NamedTuple, not a frozen dataclass: one is built per
    request, and a frozen dataclass's ``__init__`` runs interpreted, one ``object.__setattr__``
    per field, about twice a tuple's cost)."""

    method: str
    target: str
    """Request target as sent (origin-form ``/path?query`` normally)."""
    version: str
    """``HTTP/1.1`` or ``HTTP/1.0``."""
    headers: Headers
    chunked: bool
    """Body framed with chunked transfer coding."""
    content_length: int | None
    """Body length when framed by Content-Length (None if chunked or no body)."""

    @property
    def keep_alive(self) -> bool:
        return _keep_alive(self.version, self.headers)


class ResponseHead(NamedTuple):
    """A response head (a NamedTuple for the reason given at `RequestHead`)."""

    status: int
    reason: str
    version: str
    headers: Headers
    chunked: bool
    content_length: int | None
    until_close: bool
    """Body delimited by the connection closing (RFC 9112 §6.3 rule 8)."""

    @property
    def informational(self) -> bool:
        """1xx: another head follows for the same request (RFC 9110 §15.2)."""
        return 100 <= self.status < 200

    @property
    def keep_alive(self) -> bool:
        return not self.until_close and _keep_alive(self.version, self.headers)


@dataclass(frozen=True, slots=True)
class Body:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    trailers: Headers = ()


Event = RequestHead | ResponseHead | Body | EndOfMessage
_END: Final = EndOfMessage()
"""The end of a message without trailers (immutable: one for all)."""


def header_value(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    """All values of `name` joined with ", " (RFC 9110 §5.3), or None if absent."""
    values = [v for k, v in headers if k == name]
    return ", ".join(values) if values else None


def _tokens(value: str | None) -> list[str]:
    # OWS is SP / HTAB only (RFC 9110 §5.6.3): str.strip() would also eat U+00A0 and make
    # "chunked\xa0" count as chunked.
    return [t.strip(" \t").lower() for t in value.split(",")] if value else []


def _keep_alive(version: str, headers: Headers) -> bool:
    conn = _tokens(header_value(headers, "connection"))
    if version == "HTTP/1.0":
        return "keep-alive" in conn
    return "close" not in conn


class _State:
    """The parser's states: plain ints, not an `enum.Enum` (a member lookup on an Enum class
    costs ~0.2 us on Python 3.11, and the parser looks at its state several times a message;
    compiled, these are constants)."""

    HEAD: Final = 0
    LENGTH: Final = 1
    CHUNK_SIZE: Final = 2
    CHUNK_DATA: Final = 3
    CHUNK_CRLF: Final = 4
    TRAILERS: Final = 5
    UNTIL_CLOSE: Final = 6
    DONE: Final = 7


def _field_lines(text: str, pos: int, count: int) -> Headers | None:
    """The `count` field lines of `text` from `pos` (just after a CR LF; every line, the last
    one too, ended by CR LF), names lower-cased, values without their OWS; None unless every
    one of them is a well-formed field line (then the checked parser reads them and words the
    refusal). `_FIELD` matches only a whole line (it starts right after a CR LF and has no CR
    or LF inside), so `count` matches are `count` lines when the caller's `text` has `count`
    line ends after `pos` and no bare CR or LF."""
    pairs: list[tuple[str, str]] = _FIELD.findall(text, pos)
    if len(pairs) != count:
        return None
    return tuple([(k.lower(), v.rstrip(" \t")) for k, v in pairs])


class Http1Parser:
    """Parse one direction of an HTTP/1.1 connection. `feed` bytes, then call `next_event`
    until it returns None (needs more data)."""

    def __init__(self, role: Role, *, max_head: int = MAX_HEAD, fast: bool = True) -> None:
        """`fast`: the fast head reader first (a head it does not match is read again by the
        checked parser); False: the checked parser alone (the differential tests' reference)."""
        self.role = role
        self.max_head = max_head
        self._buf = bytearray()
        self._state = _State.HEAD
        self._remaining = 0
        self._eof = False
        self._trailers: list[tuple[str, str]] = []
        self._trailer_bytes = 0
        self._request_method: str | None = None
        self._interim = 0  # interim (1xx) heads before the current response's final one
        self._request_role = role is Role.REQUEST
        self._error_status = 400 if self._request_role else 502
        self._fast = fast
        # How far the head or line being read has been searched for its end (bytes at the
        # front of `_buf`): the next search resumes just before it, so a head trickled in one
        # byte per read costs linear time, not a search of the whole buffer per read. 0 when
        # that head or line is consumed (nothing else takes bytes from the front meanwhile).
        self._scanned = 0
        self._empty = 0  # empty lines ignored before the start line being read

    # ---- input -------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._buf += data

    def feed_eof(self) -> None:
        self._eof = True

    def expect_response_to(self, method: str) -> None:
        """Response role: the method of the request this response answers (HEAD: no body,
        CONNECT 2xx: tunnel, RFC 9112 §6.3 rules 1-2)."""
        self._request_method = method

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_buffered(self) -> bytes:
        """Hand over the unparsed bytes (after an Upgrade's 101 they are not HTTP)."""
        data, self._buf = bytes(self._buf), bytearray()
        self._scanned = 0
        return data

    @property
    def idle(self) -> bool:
        """Between messages with nothing buffered."""
        return self._state == _State.HEAD and not self._buf

    # ---- events ------------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next event, or None when more bytes are needed. Raises HttpParseError, and
        raises it for a message cut short by EOF."""
        st = self._state
        if st == _State.HEAD:
            return self._head()
        if st == _State.LENGTH:
            if not self._buf:
                if self._eof:
                    raise self._fail("connection closed inside a Content-Length body")
                return None
            n = min(self._remaining, len(self._buf))
            data = bytes(self._buf[:n])
            del self._buf[:n]
            self._remaining -= n
            if self._remaining == 0:
                self._state = _State.DONE
            return Body(data)
        if st == _State.UNTIL_CLOSE:
            if self._buf:
                data = bytes(self._buf)
                self._buf.clear()
                return Body(data)
            if self._eof:
                return self._end(())
            return None
        if st == _State.DONE:
            return self._end(())
        return self._chunked()

    def _fail(self, message: str) -> HttpParseError:
        return HttpParseError(message, self._error_status)

    def _end(self, trailers: Headers) -> EndOfMessage:
        self._state = _State.HEAD
        self._trailers = []
        self._trailer_bytes = 0
        return EndOfMessage(trailers) if trailers else _END

    def _head(self) -> Event | None:
        buf = self._buf
        if buf and (buf[0] == 13 or buf[0] == 10):  # CR, LF: a start line never begins so
            # RFC 9112 §2.2: a server SHOULD ignore at least one empty line (CRLF) received
            # before a request line; at most MAX_EMPTY_LINES of them. Stripped and counted
            # before the head end is searched for, so the verdict is the same however the lines
            # were split across reads.
            if buf[:2] == b"\r\n":
                while buf[:2] == b"\r\n":
                    del buf[:2]
                    self._empty += 1
                    if self._empty > MAX_EMPTY_LINES:
                        raise self._fail(
                            f"more than {MAX_EMPTY_LINES} empty lines before a start line"
                        )
                self._scanned = 0
            # A bare CR or LF before the start line is refused as it is in the rest of a head
            # (RFC 9112 §2.2: a bare CR MUST be refused or replaced); a lone CR waits for its LF.
            if buf and (buf[0] == 10 or (buf[0] == 13 and len(buf) > 1)):
                raise self._fail("bare CR or LF in the message head")
        # Resumed 3 bytes before where the last search stopped (a CR LF CR LF split across
        # reads).
        end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if end < 0:
            self._scanned = len(buf)
            if len(buf) > self.max_head:
                raise HttpParseError("message head too large", 431 if self._request_role else 502)
            if self._eof and buf:
                raise self._fail("connection closed inside a message head")
            return None
        if end > self.max_head:
            raise HttpParseError("message head too large", 431 if self._request_role else 502)
        raw = bytes(buf[:end])
        del buf[: end + 4]
        self._scanned = 0
        self._empty = 0
        crlf = raw.count(b"\r\n")
        if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:
            raise self._fail("bare CR or LF in the message head")
        if crlf > MAX_HEADERS:
            raise HttpParseError(
                f"more than {MAX_HEADERS} header fields", 431 if self._request_role else 502
            )
        if self._fast:
            head: Event | None = (
                self._fast_request(raw, crlf)
                if self._request_role
                else self._fast_response(raw, crlf)
            )
            if head is not None:
                return head
        lines = raw.split(b"\r\n")
        headers = self._fields(lines[1:])
        if self._request_role:
            return self._request(lines[0], headers)
        return self._response(lines[0], headers)

    def _fast_request(self, raw: bytes, fields: int) -> RequestHead | None:
        """The request head read by the fast reader (`raw` has `fields` field lines and no bare
        CR or LF), then the same checks as `_request` from the version on; None when it does
        not match exactly what `_request` and `_fields` accept: the checked parser decides."""
        text = raw.decode("latin-1") + "\r\n"
        m = _REQUEST_LINE.match(text)
        if m is None:
            return None
        headers = _field_lines(text, m.end(), fields)
        if headers is None:
            return None
        return self._request_head(m[1], m[2], m[3], headers)

    def _fast_response(self, raw: bytes, fields: int) -> ResponseHead | None:
        """The response head read by the fast reader, as `_fast_request`; then the same status
        and framing checks as `_response` (`_response_head`)."""
        text = raw.decode("latin-1") + "\r\n"
        m = _STATUS_LINE.match(text)
        if m is None:
            return None
        headers = _field_lines(text, m.end(), fields)
        if headers is None:
            return None
        return self._response_head(int(m[2]), m[3] or "", m[1], headers)

    def _fields(self, lines: Sequence[bytes]) -> Headers:
        # Fast path (every well-formed field section): the lines as latin-1 text, one `findall`
        # (`_field_lines`; no line here holds a CR LF of its own: they were split on it).
        # Anything it does not accept goes through `_fields_checked`, which raises the precise
        # error.
        if not lines:
            return ()
        if self._fast:
            text = "\r\n" + b"\r\n".join(lines).decode("latin-1") + "\r\n"
            headers = _field_lines(text, 2, len(lines))
            if headers is not None:
                return headers
        return self._fields_checked(lines)

    def _fields_checked(self, lines: Sequence[bytes]) -> Headers:
        out: list[tuple[str, str]] = []
        for line in lines:
            if line[:1] in (b" ", b"\t"):
                raise self._fail("obsolete line folding (RFC 9112 §5.2)")
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name):
                raise self._fail(f"malformed header field {line[:40]!r}")
            value = value.strip(b" \t")
            if _BAD_VALUE.search(value):
                raise self._fail(f"control character in the value of {name[:40]!r}")
            # obs-text (0x80-0xff) is kept as latin-1 (RFC 9110 §5.5).
            out.append((name.decode("ascii").lower(), value.decode("latin-1")))
        return tuple(out)

    def _framing(self, headers: Headers) -> tuple[bool, int | None]:
        """(chunked, content_length) per RFC 9112 §6.3."""
        te = _tokens(header_value(headers, "transfer-encoding"))
        cls = [v for k, v in headers if k == "content-length"]
        if te:
            if cls:
                raise self._fail("both Transfer-Encoding and Content-Length (§6.3 rule 3)")
            if te[-1] != "chunked" or te.count("chunked") != 1:
                raise self._fail(f"unsupported Transfer-Encoding {te!r}")
            if te != ["chunked"]:
                # RFC 9112 §6.1: a server answers a coding it does not know 501; a response
                # in one is the upstream's fault, a bad gateway for the client (RFC 9110 §15.6.3).
                raise HttpParseError(
                    f"unsupported transfer coding {te!r}", 501 if self._request_role else 502
                )
            return True, None
        if cls:
            # A list of equal values is one value (RFC 9110 §8.6); its OWS is SP / HTAB only
            # (§5.6.3): str.strip() would also take U+00A0 or U+0085 and read "5\xa0" as 5.
            values = {v.strip(" \t") for c in cls for v in c.split(",")}
            if len(values) != 1:
                raise self._fail("conflicting Content-Length values (§6.3 rule 5)")
            text = values.pop()
            # ASCII digits only: str.isdigit() accepts "²" (then int() raises).
            if not _DIGITS.fullmatch(text.encode("latin-1")):
                raise self._fail(f"bad Content-Length {text[:20]!r}")
            return False, int(text)
        return False, None

    def _request(self, line: bytes, headers: Headers) -> RequestHead:
        parts = line.split(b" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
            raise self._fail(f"malformed request line {line[:60]!r}")
        if not _METHOD.fullmatch(parts[0]):
            raise self._fail(f"method {parts[0][:20]!r} is not upper case")
        if not _VISIBLE.fullmatch(parts[1]):
            raise self._fail("control or non-ASCII character in the request-target")
        version = parts[2].decode("ascii", "replace")
        return self._request_head(
            parts[0].decode("ascii"), parts[1].decode("ascii"), version, headers
        )

    def _request_head(
        self, method: str, target: str, version: str, headers: Headers
    ) -> RequestHead:
        """The checks after the request line's syntax (either parser): version, Host,
        framing."""
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise HttpParseError(f"unsupported HTTP version {version!r}", 505)
        hosts = 0
        for k, _ in headers:
            if k == "host":
                hosts += 1
        if hosts > 1:
            raise self._fail("more than one Host field line (RFC 9112 §3.2)")
        if version == "HTTP/1.1" and hosts == 0:
            raise self._fail("HTTP/1.1 request without Host (RFC 9112 §3.2)")
        chunked, length = self._framing(headers)
        if chunked:
            self._state = _State.CHUNK_SIZE
        elif length:
            self._state, self._remaining = _State.LENGTH, length
        else:
            self._state = _State.DONE  # §6.3 rule 6: no framing = no body for a request
        return RequestHead(
            method=method,
            target=target,
            version=version,
            headers=headers,
            chunked=chunked,
            content_length=length,
        )

    def _response(self, line: bytes, headers: Headers) -> ResponseHead:
        parts = line.split(b" ", 2)
        # HTTP-version = "HTTP/" DIGIT "." DIGIT (RFC 9112 §2.3): anything else after
        # "HTTP/1." (a non-ASCII byte raised UnicodeDecodeError here) is a malformed line.
        # status-code = 3DIGIT (RFC 9112 §4): "0000200" or "20" is not a status code.
        if (
            len(parts) < 2
            or _RESPONSE_VERSION.fullmatch(parts[0]) is None
            or _STATUS_CODE.fullmatch(parts[1]) is None
        ):
            raise self._fail(f"malformed status line {line[:60]!r}")
        reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        return self._response_head(int(parts[1]), reason, parts[0].decode("ascii"), headers)

    def _response_head(
        self, status: int, reason: str, version: str, headers: Headers
    ) -> ResponseHead:
        """The checks after the status line's syntax (either parser): status range, framing
        (RFC 9112 §6.3)."""
        if not 100 <= status <= 999:
            raise self._fail(f"bad status {status}")
        if _BAD_REASON.search(reason):
            raise self._fail("control character in the reason phrase")
        if 100 <= status < 200 and status != 101:
            self._interim += 1
            if self._interim > MAX_INTERIM_HEADS:
                raise self._fail(f"more than {MAX_INTERIM_HEADS} interim (1xx) responses")
        else:
            self._interim = 0
        chunked, length, until_close = False, None, False
        no_body = (
            100 <= status < 200
            or status in (204, 304)
            or self._request_method == "HEAD"
            or (self._request_method == "CONNECT" and 200 <= status < 300)
        )
        if no_body:
            self._state = _State.DONE
        else:
            chunked, length = self._framing(headers)
            if chunked:
                self._state = _State.CHUNK_SIZE
            elif length is not None:
                if length:
                    self._state, self._remaining = _State.LENGTH, length
                else:
                    self._state = _State.DONE
            else:
                self._state, until_close = _State.UNTIL_CLOSE, True
        return ResponseHead(
            status=status,
            reason=reason,
            version=version,
            headers=headers,
            chunked=chunked,
            content_length=length,
            until_close=until_close,
        )

    def _chunked(self) -> Event | None:
        """RFC 9112 §7.1: chunk-size [ext] CRLF data CRLF ... 0 CRLF trailers CRLF."""
        while True:
            st = self._state
            if st == _State.CHUNK_SIZE:
                line = self._line(MAX_CHUNK_LINE, "chunk size line too long")
                if line is None:
                    return self._need_more()
                self._chunk_size(line)
            elif st == _State.CHUNK_DATA:
                if not self._buf:
                    return self._need_more()
                return self._chunk_data()
            elif st == _State.CHUNK_CRLF:
                if len(self._buf) < 2:
                    return self._need_more()
                if self._buf[:2] != b"\r\n":
                    raise self._fail("chunk data not followed by CRLF")
                del self._buf[:2]
                self._state = _State.CHUNK_SIZE
            else:  # TRAILERS
                line = self._line(self.max_head, "trailer section too large")
                if line is None:
                    return self._need_more()
                if not line:
                    return self._end(tuple(self._trailers))
                self._trailer(line)

    def _line(self, limit: int, too_long: str) -> bytes | None:
        """The next CRLF-terminated line, consumed without its CRLF; None while it is
        incomplete, an error once the incomplete line is past `limit`."""
        eol = self._buf.find(b"\r\n", max(0, self._scanned - 1))  # resumed, as in `_head`
        if eol < 0:
            self._scanned = len(self._buf)
            if len(self._buf) > limit:
                raise self._fail(too_long)
            return None
        line = bytes(self._buf[:eol])
        del self._buf[: eol + 2]
        self._scanned = 0
        return line

    def _chunk_size(self, line: bytes) -> None:
        m = _CHUNK_SIZE.fullmatch(line)
        if m is None:
            raise self._fail(f"bad chunk size line {line[:20]!r}")
        size = int(m.group(1), 16)
        if size == 0:
            self._state = _State.TRAILERS
        else:
            self._state, self._remaining = _State.CHUNK_DATA, size

    def _chunk_data(self) -> Body:
        n = min(self._remaining, len(self._buf))
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._remaining -= n
        if self._remaining == 0:
            self._state = _State.CHUNK_CRLF
        return Body(data)

    def _trailer(self, line: bytes) -> None:
        """One trailer field line (RFC 9112 §7.1.2), bounded like a head."""
        self._trailer_bytes += len(line) + 2
        if self._trailer_bytes > self.max_head:
            raise self._fail("trailer section too large")
        if len(self._trailers) >= MAX_HEADERS:
            raise HttpParseError(
                f"more than {MAX_HEADERS} trailer fields",
                431 if self._request_role else 502,
            )
        self._trailers.extend(self._fields([line]))

    def _need_more(self) -> Event | None:
        if self._eof:
            raise self._fail("connection closed inside a chunked body")
        return None


# ---- encoders ----------------------------------------------------------------------------------


def hop_by_hop_and(*names: str) -> frozenset[str]:
    """The hop-by-hop field names and `names` (lower-case): a `strip_hop_by_hop` `drop` set,
    built once by its caller (not per message)."""
    return _HOP_BY_HOP.union(names)


def strip_hop_by_hop(
    headers: Sequence[tuple[str, str]], drop: frozenset[str] = _HOP_BY_HOP
) -> list[tuple[str, str]]:
    """Remove hop-by-hop fields (RFC 9110 §7.6.1), including those named by Connection, and
    whatever else `drop` names (`hop_by_hop_and`; the default: the hop-by-hop fields alone).
    One pass over `headers`; a set is built only when Connection names a field `drop` does
    not already hold (``Connection: keep-alive`` or ``close`` does not)."""
    named = _tokens(header_value(headers, "connection"))
    for name in named:
        if name not in drop:
            drop = drop.union(named)
            break
    return [(k, v) for k, v in headers if k not in drop]


def _head_bytes(first: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """The head: `first` and one line per field. It must not gain a line (header injection,
    response splitting: RFC 9112 §11.1), so no part may hold CR, LF or NUL; counted over the
    joined text at once (one scan per head, not three per field), per field only to name the
    one that has it."""
    parts = [first]
    parts += [f"{k}: {v}" for k, v in headers]
    text = "\r\n".join(parts)
    lines = len(parts) - 1
    if text.count("\r") != lines or text.count("\n") != lines or "\x00" in text:
        for k, v in headers:
            if "\r" in v or "\n" in v or "\x00" in v:
                raise HttpParseError(f"header {k!r} value contains CR/LF/NUL", 500)
        raise HttpParseError("CR/LF/NUL in a field name or the start line", 500)
    return (text + "\r\n\r\n").encode("latin-1")


def encode_request_head(method: str, target: str, headers: Sequence[tuple[str, str]]) -> bytes:
    return _head_bytes(f"{method} {target} HTTP/1.1", headers)


def encode_response_head(status: int, reason: str, headers: Sequence[tuple[str, str]]) -> bytes:
    return _head_bytes(f"HTTP/1.1 {status} {reason or reason_phrase(status)}", headers)


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data) if data else b""


def encode_last_chunk(trailers: Sequence[tuple[str, str]] = ()) -> bytes:
    return b"0\r\n" + b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in trailers) + b"\r\n"


_REASONS = {
    100: "Continue",
    101: "Switching Protocols",
    200: "OK",
    201: "Created",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Unknown")
