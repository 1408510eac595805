"""Back-pressure from the TLS transport to the tunnels' sources (`HboneProtocol.pause_writing`,
issue 14): a connection whose transport is over its high-water mark stops reading every local
source, so what it buffers is bounded by that mark, not by the peer's windows (4 MiB per
stream, 16 MiB per connection); a WINDOW_UPDATE from the peer does not undo that."""

from __future__ import annotations

import asyncio

from meshcore.hbone.aio import HboneProtocol, HboneSettings, HboneStream
from meshcore.hbone.events import WindowOpened
from meshcore.hbone.streams import Role


class Sink:
    write_paused = False

    def __init__(self) -> None:
        self.reading = True

    def tunnel_data(self, data: bytes) -> None: ...

    def tunnel_eof(self) -> None: ...

    def tunnel_reset(self, code: int, remote: bool) -> None: ...

    def tunnel_pause_source(self) -> None:
        self.reading = False

    def tunnel_resume_source(self) -> None:
        self.reading = True


async def _protocol_with_streams(n: int) -> tuple[HboneProtocol, list[Sink]]:
    proto = HboneProtocol(Role.CLIENT, HboneSettings(trust_domain="cluster.local"))
    proto.conn.initiate(0.0)
    sinks = []
    for _ in range(n):
        sid = proto.conn.open_connect("10.0.0.1:80", [])
        stream = HboneStream(proto, sid)
        sink = Sink()
        stream.sink = sink
        proto.streams[sid] = stream
        sinks.append(sink)
    return proto, sinks


def test_transport_over_its_mark_pauses_every_source_until_it_drains() -> None:
    async def main() -> None:
        proto, sinks = await _protocol_with_streams(3)
        proto.pause_writing()
        assert not any(s.reading for s in sinks)
        # The peer opening its windows must not restart sources the transport holds back.
        proto._dispatch([WindowOpened(tuple(proto.streams))])
        assert not any(s.reading for s in sinks)
        proto.resume_writing()
        assert all(s.reading for s in sinks)

    asyncio.run(main())
