"""HTTP/2 wire constants and frame encoders (RFC 9113 §4, §6, §7).

Owns: the byte layout of the frames HBONE sends, and of the frame header both ways
(`HEADER_LAYOUT`). Decoding lives in `connection.py`, where it is fused with flow control so DATA
payloads can be streamed without reassembly.
Invariant: every encoder returns a complete frame (9-octet header + payload) as `bytes`.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

# RFC 9113 §3.4: the client connection preface.
CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class FrameType(IntEnum):
    """RFC 9113 §6 frame types."""

    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag:
    """RFC 9113 §6 frame flags (the meaning depends on the frame type)."""

    END_STREAM: Final = 0x1
    ACK: Final = 0x1
    END_HEADERS: Final = 0x4
    PADDED: Final = 0x8
    PRIORITY: Final = 0x20


class ErrorCode(IntEnum):
    """RFC 9113 §7 error codes, used in RST_STREAM and GOAWAY."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting(IntEnum):
    """RFC 9113 §6.5.2 setting identifiers."""

    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


# RFC 9113 §6.5.2 / §6.9.1 limits and defaults.
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_FRAME_LIMIT = 16_777_215
MAX_WINDOW = 2**31 - 1
FRAME_HEADER = 9  # octets before every frame's payload (§4.1)
HEADER_LAYOUT: Final = struct.Struct(">IBI")
"""The frame header (§4.1) as three fields: length (24 bits) << 8 | type, flags, and the
reserved bit + stream id (31 bits). One `pack`/`unpack_from` call per header: building or
parsing it from `int.to_bytes`/`int.from_bytes` of slices cost 3-5 objects per frame
(bench/README.md, "Session 7: DATA-frame path")."""


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    """The FRAME_HEADER-octet frame header (RFC 9113 §4.1)."""
    return HEADER_LAYOUT.pack((length << 8) | ftype, flags, stream_id)


def encode_settings(settings: dict[int, int]) -> bytes:
    payload = b"".join(struct.pack(">HI", k, v) for k, v in settings.items())
    return frame_header(len(payload), FrameType.SETTINGS, 0, 0) + payload


def encode_settings_ack() -> bytes:
    return frame_header(0, FrameType.SETTINGS, Flag.ACK, 0)


def encode_window_update(stream_id: int, increment: int) -> bytes:
    return frame_header(4, FrameType.WINDOW_UPDATE, 0, stream_id) + increment.to_bytes(4, "big")


def encode_rst_stream(stream_id: int, code: int) -> bytes:
    return frame_header(4, FrameType.RST_STREAM, 0, stream_id) + code.to_bytes(4, "big")


def encode_ping(opaque: bytes, *, ack: bool = False) -> bytes:
    return frame_header(8, FrameType.PING, Flag.ACK if ack else 0, 0) + opaque


def encode_goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    payload = struct.pack(">II", last_stream_id, code) + debug
    return frame_header(len(payload), FrameType.GOAWAY, 0, 0) + payload
