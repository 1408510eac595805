"""Sans-I/O HTTP/1.1 message codec (RFC 9112) for a proxy: parse requests or responses from
bytes into events, and serialise heads and body framing.

Owns: `Http1Parser` (one direction of one connection: requests from a client, or responses from
a server), its events (`RequestHead`, `ResponseHead`, `Body`, `EndOfMessage`), and the encoders;
the use of llhttp (`httptools`) to read request and response heads.

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
  final response.
- A request line has an upper-case token method (RFC 9110 §9.1; Istio refuses other verbs
  with 400) and a visible-ASCII target (RFC 9112 §3.2); an HTTP/1.1 request has exactly one
  Host field line (RFC 9112 §3.2); a status code is exactly three digits (RFC 9112 §4).
  Numbers (Content-Length, chunk sizes) are ASCII digits only, with no surrounding whitespace
  in chunk sizes (RFC 9112 §7.1); list tokens are split on SP/HTAB only, never on other
  Unicode whitespace.
- llhttp reads a head only as an accelerator, and fails closed whatever its own character
  tables say: its result is kept only when the head has no control character our field rules
  refuse, every field name is a token, llhttp read exactly as many field lines as the head
  has, and the start line is byte for byte what llhttp read: `method SP target SP HTTP/1.x`
  with a visible-ASCII target, or `HTTP/1.x SP status [SP reason]`; the Host, version, status
  and framing checks then run on it as on ours. Anything else, and anything llhttp refuses,
  is read again by the checked parser, so every refusal, its status and its message are the
  checked parser's (`tests/unit/test_http1_llhttp.py`, `test_http1_llhttp_response.py`,
  differential). Bodies and trailers are always the checked parser's (only it knows that a
  response answers HEAD or CONNECT).
- The parser is reusable across keep-alive messages: after `EndOfMessage` it parses the next
  message from the bytes already buffered (pipelining is handled by the caller's one-at-a-time
  loop).
"""

from __future__ import annotations

import enum
import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from meshcore.errors import MeshError
from meshcore.hbone.headerblock import MAX_INTERIM_HEADS as MAX_INTERIM_HEADS  # one bound, 502 here

_httptools: Any
try:
    # llhttp, Node.js's HTTP/1.1 parser, in C: reads request heads ~5x faster than the checked
    # parser below (bench/README.md, "Waypoint, session 5"). Optional: without it the checked
    # parser reads every head.
    _httptools = importlib.import_module("httptools")
except ImportError:
    _httptools = None

MAX_HEAD = 60 * 1024
"""Largest request/response head accepted (Envoy's default max_request_headers_kb is 60)."""
MAX_HEADERS = 100
"""Most field lines in a head or a trailer section (Envoy's default max_headers_count)."""
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
# The same rule over a whole field section (CR LF separate its lines; bare ones are refused
# before), and one field line as latin-1 text: token ":" OWS value OWS (RFC 9112 §5).
_BAD_VALUE_BLOCK = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_FIELD_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*?)[ \t]*")
_RESPONSE_VERSION = re.compile(rb"HTTP/1\.[0-9]")
# Lower-cased token field names, one per line (`_LlhttpFields.tokens`).
_NAMES = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+(?:\n[!#$%&'*+\-.^_`|~0-9a-z]+)*")
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


class _LlhttpFields:
    """What llhttp (httptools) calls back while it reads one head: the target or reason, the
    field lines, whether the head completed and whether anything followed it. It never refers
    to its parser: httptools' parser holds this object's bound methods, so a reference back
    would make a reference cycle per parser, garbage only the cyclic GC frees (one per
    response head; `tests/loopback/test_waypoint_garbage.py`)."""

    def __init__(self) -> None:
        self.url = self.reason = b""
        self.fields: list[tuple[str, str]] = []
        self.complete = self.extra = False
        self.done = True  # a fresh parser is reusable

    def start(self) -> None:
        self.url = self.reason = b""
        self.fields = []
        self.complete = self.done = self.extra = False

    def on_url(self, url: bytes) -> None:
        self.extra = self.extra or self.complete
        self.url += url

    def on_status(self, reason: bytes) -> None:
        self.extra = self.extra or self.complete
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.extra = self.extra or self.complete
        # (A non-ASCII name byte would raise here, which httptools reports as a refusal; the
        # names are checked to be tokens together, `tokens`.)
        # llhttp drops the value's leading OWS, not its trailing OWS (RFC 9112 §5: not part
        # of the value); obs-text is kept as latin-1.
        self.fields.append((name.decode("ascii").lower(), value.rstrip(b" \t").decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.complete = True

    def on_message_complete(self) -> None:
        self.done = True

    def tokens(self) -> bool:
        """Every field name is a token (RFC 9110 §5.1), whatever llhttp's tables allow: one
        regex over the names for the whole head (one per name cost ~2 us a head)."""
        fields = self.fields
        return not fields or _NAMES.fullmatch("\n".join([k for k, _ in fields])) is not None


class _LlhttpHead:
    """llhttp (through httptools) reading the heads of one `Http1Parser`: the parser and what
    it read (`got`, the object httptools calls back). Only heads are fed (the checked parser
    frames bodies), so a request parser is reused only after a message it saw end (a bodiless
    request); after a head with a body, an upgrade or a refusal a new one is made. A response
    head gets a new one each time (`Http1Parser._llhttp_response`). Freed by reference
    counting alone: this object holds the parser and `got`, the parser holds `got`, and
    nothing refers back."""

    def __init__(self, response: bool = False) -> None:
        self.got = got = _LlhttpFields()
        self.parser: Any = (
            _httptools.HttpResponseParser(got) if response else _httptools.HttpRequestParser(got)
        )

    @property
    def reusable(self) -> bool:
        got = self.got
        return got.done and not got.extra

    def read(self, raw: bytes, fields: int) -> bool:
        """Feed one head (`raw`, without its blank line) from the start: whether llhttp read
        exactly it, i.e. one complete head of `fields` field lines with token names and nothing
        after (no field lost or merged), and `raw` has no control character our field rules
        refuse (the checked parser words that refusal). A head llhttp refuses, or pauses after
        (an upgrade, CONNECT, a 101), leaves this parser not reusable."""
        if _BAD_VALUE_BLOCK.search(raw) is not None:
            return False
        got = self.got
        got.start()
        try:
            self.parser.feed_data(raw + b"\r\n\r\n")
        except Exception as err:  # llhttp refused the head, or paused after it
            got.done = False
            if not isinstance(err, _httptools.HttpParserUpgrade):
                return False
        return got.complete and not got.extra and len(got.fields) == fields and got.tokens()


class Http1Parser:
    """Parse one direction of an HTTP/1.1 connection. `feed` bytes, then call `next_event`
    until it returns None (needs more data)."""

    def __init__(self, role: Role, *, max_head: int = MAX_HEAD, llhttp: bool = True) -> None:
        """`llhttp`: let llhttp read the heads when httptools is installed (a head llhttp
        refuses, or reads differently, is read again by the checked parser)."""
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
        self._llhttp = llhttp and _httptools is not None
        self._ll: _LlhttpHead | None = None

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
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            # RFC 9112 §2.2: a server SHOULD ignore at least one empty line before a request.
            while self._buf.startswith(b"\r\n"):
                del self._buf[:2]
            if len(self._buf) > self.max_head:
                raise HttpParseError("message head too large", 431 if self._request_role else 502)
            if self._eof and self._buf:
                raise self._fail("connection closed inside a message head")
            return None
        if end > self.max_head:
            raise HttpParseError("message head too large", 431 if self._request_role else 502)
        raw = bytes(self._buf[:end])
        del self._buf[: end + 4]
        raw = raw.lstrip(b"\r\n")
        crlf = raw.count(b"\r\n")
        if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:
            raise self._fail("bare CR or LF in the message head")
        if crlf > MAX_HEADERS:
            raise HttpParseError(
                f"more than {MAX_HEADERS} header fields", 431 if self._request_role else 502
            )
        if self._llhttp:
            head: Event | None = (
                self._llhttp_request(raw, crlf)
                if self._request_role
                else self._llhttp_response(raw, crlf)
            )
            if head is not None:
                return head
        lines = raw.split(b"\r\n")
        headers = self._fields(lines[1:])
        if self._request_role:
            return self._request(lines[0], headers)
        return self._response(lines[0], headers)

    def _llhttp_request(self, raw: bytes, fields: int) -> RequestHead | None:
        """The request head parsed by llhttp: its request line and `fields` field lines, then
        the same checks as `_request` from the Host count on. None when llhttp refuses the
        head, or its result is not one `_fields` + `_request` would give: the checked parser
        then decides (and words every refusal), so llhttp only ever speeds up a head both
        parsers accept identically (`tests/unit/test_http1_llhttp.py`, differential)."""
        ll = self._ll
        if ll is None or not ll.reusable:
            ll = self._ll = _LlhttpHead()
        if not ll.read(raw, fields):
            return None
        got = ll.got
        # The request line exactly `method SP target SP HTTP-version` (RFC 9112 §3; llhttp
        # also takes runs of spaces, "GET /" as HTTP/0.9 and HTTP/2.0: the checked parser
        # words those refusals) with a visible-ASCII target (§3.2).
        method: bytes = ll.parser.get_method()
        eol = raw.find(b"\r\n")
        line = raw if eol < 0 else raw[:eol]
        start = method + b" " + got.url
        if line == start + b" HTTP/1.1":
            version = "HTTP/1.1"
        elif line == start + b" HTTP/1.0":
            version = "HTTP/1.0"
        else:
            return None
        if not _VISIBLE.fullmatch(got.url):
            return None
        return self._request_head(
            method.decode("ascii"), got.url.decode("ascii"), version, tuple(got.fields)
        )

    def _llhttp_response(self, raw: bytes, fields: int) -> ResponseHead | None:
        """The response head parsed by llhttp, under the same discipline as
        `_llhttp_request`: kept only when llhttp read exactly `fields` field lines with token
        names, the head has no control character our field rules refuse, and the status line
        is byte for byte ``HTTP/1.x SP status [SP reason]`` as llhttp read it; then the same
        status and framing checks as `_response` (`_response_head`). A new llhttp parser per
        head (0.2 us): after a head with a body llhttp waits for the body, which it is never
        fed (the checked parser frames bodies, and only it knows the request was HEAD)."""
        ll = _LlhttpHead(response=True)
        if not ll.read(raw, fields):
            return None
        version: str = ll.parser.get_http_version()
        if version not in ("1.1", "1.0"):
            return None
        status: int = ll.parser.get_status_code()
        eol = raw.find(b"\r\n")
        line = raw if eol < 0 else raw[:eol]
        start = b"HTTP/%s %03d" % (version.encode("ascii"), status)
        if line == start:
            reason = ""
        elif line == start + b" " + ll.got.reason:
            reason = ll.got.reason.decode("latin-1")
        else:
            return None
        return self._response_head(status, reason, "HTTP/" + version, tuple(ll.got.fields))

    def _fields(self, lines: Sequence[bytes]) -> Headers:
        # Fast path (every well-formed head): the field lines decoded once as latin-1 (obs-text
        # kept, RFC 9110 §5.5; token names are ASCII either way), one regex per line, the
        # control-character rule checked once for the whole section (CR and LF: a line with
        # one does not match). Anything it does not accept goes through `_fields_checked`,
        # which raises the precise error.
        block = b"\r\n".join(lines)
        if _BAD_VALUE_BLOCK.search(block) is None:
            texts = block.decode("latin-1").split("\r\n") if lines else []
            if len(texts) == len(lines):  # no line held a CR LF of its own
                out: list[tuple[str, str]] = []
                match = _FIELD_LINE.fullmatch
                for line in texts:
                    m = match(line)
                    if m is None:
                        break
                    out.append((m[1].lower(), m[2]))
                else:
                    return tuple(out)
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
            values = {v.strip() for c in cls for v in c.split(",")}
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
        hosts = sum(1 for k, _ in headers if k == "host")
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
        eol = self._buf.find(b"\r\n")
        if eol < 0:
            if len(self._buf) > limit:
                raise self._fail(too_long)
            return None
        line = bytes(self._buf[:eol])
        del self._buf[: eol + 2]
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


def strip_hop_by_hop(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Remove hop-by-hop fields (RFC 9110 §7.6.1), including those named by Connection."""
    named = set(_tokens(header_value(headers, "connection")))
    return [(k, v) for k, v in headers if k not in _HOP_BY_HOP and k not in named]


def _head_bytes(first: str, headers: Sequence[tuple[str, str]]) -> bytes:
    parts = [first]
    for k, v in headers:
        if "\r" in v or "\n" in v or "\x00" in v:
            raise HttpParseError(f"header {k!r} value contains CR/LF/NUL", 500)
        parts.append(f"{k}: {v}")
    parts.append("\r\n")
    return "\r\n".join(parts).encode("latin-1")


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
