"""The connection-level control of one HTTP/2 (HBONE) connection: SETTINGS both ways, PING and
GOAWAY (RFC 9113 §6.5, §6.7, §6.8).

Owns: `ConnectionControl` (a layer of `meshcore.hbone.connection.HboneConnection`, above flow
control): the settings we advertise (Istio's HBONE values, docs/reference/ambient-facts.md) and
the peer's we honour, the connection preface and our first SETTINGS (`initiate`), keepalive PING
state, GOAWAY sent and received, whether a new stream may be opened (`can_open_stream`), and the
PING/SETTINGS budget (each forces a reply frame, CVE-2019-9512/9515).

Invariants:
- A setting of ours binds the peer only once it acknowledged it (§6.5.3): until the ACK,
  `_settings_sent_at` is set, the SETTINGS timeout runs (`SETTINGS_TIMEOUT`) and the stream
  limit is the pre-ACK bound (`meshcore.hbone.headerblock`).
- The peer's settings are range-checked as §6.5.2 says; unknown ones are ignored.
- PING payloads come from the `rng` given to the constructor; at most one PING is outstanding.
- GOAWAY is sent once; a non-NO_ERROR one closes the connection. A received GOAWAY resets our
  streams above its last id as REFUSED_STREAM (not processed, §6.8: retryable).
"""

from __future__ import annotations

import random

from meshcore.errors import H2ProtocolError
from meshcore.hbone.budget import BUDGET_WINDOW, CONTROL_BUDGET, RateBudget, spend
from meshcore.hbone.events import (
    ConnectionTerminated,
    Event,
    PingAcked,
    SettingsReceived,
    StreamReset,
)
from meshcore.hbone.flow import CONNECTION_WINDOW, STREAM_WINDOW, FlowControl
from meshcore.hbone.frames import (
    CLIENT_PREFACE,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    MAX_FRAME_LIMIT,
    ErrorCode,
    Flag,
    Setting,
    encode_goaway,
    encode_ping,
    encode_settings,
    encode_settings_ack,
    encode_window_update,
)
from meshcore.hbone.streams import MAX_STREAM_ID, Role

# Istio's HBONE HTTP/2 settings (docs/reference/ambient-facts.md): max frame 1 MiB, 200
# concurrent streams on the server, PING every 10 s, dead after 20 s (windows: meshcore.hbone.flow).
MAX_FRAME = 1024 * 1024
SERVER_MAX_STREAMS = 200
MAX_HEADER_LIST = 64 * 1024  # advertised; enforced by meshcore.hbone.headerblock
PING_INTERVAL = 10.0
PING_TIMEOUT = 20.0
# Slowloris bound: the peer must acknowledge our SETTINGS (RFC 9113 §6.5.3 SETTINGS_TIMEOUT)
# within these many seconds.
SETTINGS_TIMEOUT = 10.0


class ConnectionControl(FlowControl):
    """SETTINGS, PING and GOAWAY of one connection (a layer of `HboneConnection`)."""

    def __init__(
        self,
        role: Role,
        *,
        max_concurrent_streams: int,
        rng: random.Random | None,
        peer_resets: RateBudget | None,
    ) -> None:
        super().__init__(role, peer_resets)
        self._rng = rng if rng is not None else random.SystemRandom()
        # Local settings (what the peer must honour) and the peer's (what we must honour).
        self.local_max_streams = max_concurrent_streams
        self.peer_max_streams = 100  # assume the §6.5.2 suggested minimum until told otherwise
        self._settings_received = False
        self._settings_sent_at: float | None = None  # until the peer's SETTINGS ACK
        self._control_budget = RateBudget(CONTROL_BUDGET, BUDGET_WINDOW)
        self.goaway_received: ConnectionTerminated | None = None
        self.goaway_sent = False
        self.closed = False
        self._ping_outstanding: bytes | None = None
        self._ping_sent_at = 0.0
        self._last_activity = 0.0

    def initiate(self, now: float = 0.0) -> None:
        """Queue the preface (client), our SETTINGS and the connection-window raise (§6.9.2)."""
        settings = {
            Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            Setting.MAX_FRAME_SIZE: MAX_FRAME,
            Setting.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            Setting.ENABLE_PUSH: 0,
        }
        if self.role is Role.SERVER:
            settings[Setting.MAX_CONCURRENT_STREAMS] = self.local_max_streams
            del settings[Setting.ENABLE_PUSH]  # §6.5.2: only a client may send ENABLE_PUSH
        else:
            self._out.append(CLIENT_PREFACE)
        self._out.append(encode_settings({int(k): v for k, v in settings.items()}))
        self._out.append(encode_window_update(0, CONNECTION_WINDOW - DEFAULT_WINDOW))
        self._last_activity = now
        self._settings_sent_at = now

    @property
    def ready(self) -> bool:
        """True once the peer's SETTINGS arrived (client: safe to size streams by them)."""
        return self._settings_received

    def can_open_stream(self, limit: int = 100) -> bool:
        """A new stream fits under the peer's MAX_CONCURRENT_STREAMS and our pool's `limit`, and
        a stream id is left (RFC 9113 §5.1.1: ids are not reused; a client that runs out opens
        a new connection. 2^30 tunnels on one pooled connection is a day at 12k/s)."""
        if self.closed or self.goaway_received is not None or self.goaway_sent:
            return False
        if self._next_stream_id > MAX_STREAM_ID:
            return False
        return len(self._streams) < min(limit, self.peer_max_streams)

    def ping(self, now: float) -> None:
        """Send a keepalive PING unless one is already outstanding."""
        if self._ping_outstanding is None:
            self._ping_outstanding = self._rng.getrandbits(64).to_bytes(8, "big")
            self._ping_sent_at = now
            self._out.append(encode_ping(self._ping_outstanding))

    def close(self, code: int = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        """Send GOAWAY (graceful when NO_ERROR: streams already open may finish, RFC 9113 §6.8)."""
        if not self.goaway_sent:
            self.goaway_sent = True
            self._out.append(encode_goaway(self._highest_peer_stream, code, debug))
        if code != ErrorCode.NO_ERROR:
            self.closed = True

    def _on_settings(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id != 0:
            raise H2ProtocolError("SETTINGS on a stream", ErrorCode.PROTOCOL_ERROR)
        if flags & Flag.ACK:
            if payload:
                raise H2ProtocolError("SETTINGS ACK with payload", ErrorCode.FRAME_SIZE_ERROR)
            self._settings_sent_at = None
            return
        if len(payload) % 6:
            raise H2ProtocolError("SETTINGS length not a multiple of 6", ErrorCode.FRAME_SIZE_ERROR)
        spend(self._control_budget, self._now, "PING and SETTINGS frames")
        changed: dict[int, int] = {}
        for off in range(0, len(payload), 6):
            ident = int.from_bytes(payload[off : off + 2], "big")
            value = int.from_bytes(payload[off + 2 : off + 6], "big")
            changed[ident] = value
            self._apply_setting(ident, value)
        self._out.append(encode_settings_ack())
        self._settings_received = True
        events.append(SettingsReceived(changed))
        if Setting.INITIAL_WINDOW_SIZE in changed:
            self._flush_all(events)

    def _apply_setting(self, ident: int, value: int) -> None:
        # RFC 9113 §6.5.2 ranges.
        if ident == Setting.INITIAL_WINDOW_SIZE:
            self._set_peer_initial_window(value)
        elif ident == Setting.MAX_FRAME_SIZE:
            if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                raise H2ProtocolError("MAX_FRAME_SIZE out of range", ErrorCode.PROTOCOL_ERROR)
            self.peer_max_frame = value
        elif ident == Setting.MAX_CONCURRENT_STREAMS:
            self.peer_max_streams = value
        elif ident == Setting.ENABLE_PUSH and (value > 1 or (value and self.role is Role.CLIENT)):
            raise H2ProtocolError("invalid ENABLE_PUSH", ErrorCode.PROTOCOL_ERROR)
        # HEADER_TABLE_SIZE only bounds a dynamic table our encoder never uses;
        # MAX_HEADER_LIST_SIZE is advisory; unknown settings are ignored (§6.5.2).

    def _on_ping(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id != 0:
            raise H2ProtocolError("PING on a stream", ErrorCode.PROTOCOL_ERROR)
        if len(payload) != 8:
            raise H2ProtocolError("PING length", ErrorCode.FRAME_SIZE_ERROR)
        if flags & Flag.ACK:
            if payload == self._ping_outstanding:
                self._ping_outstanding = None
                events.append(PingAcked(payload))
            return
        spend(self._control_budget, self._now, "PING and SETTINGS frames")
        self._out.append(encode_ping(payload, ack=True))

    def _on_goaway(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id != 0:
            raise H2ProtocolError("GOAWAY on a stream", ErrorCode.PROTOCOL_ERROR)
        if len(payload) < 8:
            raise H2ProtocolError("GOAWAY length", ErrorCode.FRAME_SIZE_ERROR)
        last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        code = int.from_bytes(payload[4:8], "big")
        event = ConnectionTerminated(code, last, True, payload[8:])
        self.goaway_received = event
        events.append(event)
        # §6.8: streams we opened above `last` were not processed: they are reset (retryable).
        for sid in [
            s for s in self._streams if s > last and (s % 2 == 1) == (self.role is Role.CLIENT)
        ]:
            del self._streams[sid]
            events.append(StreamReset(sid, ErrorCode.REFUSED_STREAM, True))
