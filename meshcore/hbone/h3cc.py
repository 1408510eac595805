"""Congestion control of HBONE over HTTP/3: aioquic's CUBIC with the restart after idle fixed.

Owns: `MeshCubic`, registered with aioquic as `CONGESTION_CONTROL` (the name
`meshcore.hbone.h3.quic_configuration` asks for).

aioquic 1.7.2's CUBIC resets the congestion window to the initial window (10 packets) and
forgets its slow-start threshold when a packet is sent 2 s after the *send time of the last
acknowledged packet*. That is an idle restart only when nothing is in flight; on a busy
connection whose round trip exceeds 2 s (a CPU-starved peer: a userspace QUIC stack
acknowledges from its event loop, so its scheduling delay is part of every RTT sample) every
send collapses the window, and with a window of 10 packets over a 1-2 s RTT the connection
carries ~10 KB/s while its pacer (window / smoothed RTT) spaces packets 100+ ms apart.

Invariant: the window restarts only after an idle period, when the sender had no bytes in
flight: RFC 5681 §4.1 restarts a TCP sender that "has not sent data in an interval exceeding
the retransmission timeout" (Linux: tcp_slow_start_after_idle, likewise only with nothing in
flight), and RFC 9002 §7.8 leaves an underutilized window as it is. Everything else is
aioquic's CUBIC (RFC 9438), unchanged; tests/unit/test_h3_aioquic_contract.py checks the
aioquic behaviour this works around.
"""

from __future__ import annotations

from aioquic.quic.congestion.base import register_congestion_control
from aioquic.quic.congestion.cubic import CubicCongestionControl
from aioquic.quic.packet_builder import QuicSentPacket

CONGESTION_CONTROL = "mesh-cubic"


class MeshCubic(CubicCongestionControl):
    """CUBIC whose restart after idle needs an idle sender (nothing in flight)."""

    def on_packet_sent(self, *, packet: QuicSentPacket) -> None:
        if self.bytes_in_flight > 0:
            # Busy, however long ago the last acknowledged packet was sent: no restart.
            self.bytes_in_flight += packet.sent_bytes
            return
        super().on_packet_sent(packet=packet)


register_congestion_control(CONGESTION_CONTROL, MeshCubic)
