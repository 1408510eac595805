"""A burst of pooled CONNECTs, one new tunnel per pump per loop iteration, on a pool whose
connections carry one stream each: every tunnel needs a dial, and tunnels keep arriving in
the loop iteration in which a dial finishes. Run in its own process
(``python -m tests.loopback.pool_burst TMP TRANSPORT``, by `test_hbone_dial`): a pool that
spins the event loop cannot be stopped from inside it. A watchdog thread exits with
`STUCK` when the loop makes no progress for `STALL` seconds; "ok" is printed at the end."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from pathlib import Path

from meshcore.hbone.pool import HbonePool, PoolKey, PoolLimits
from meshcore.identity import SpiffeId
from tests.helpers import Sink
from tests.loopback.harness import BACKEND_PORT, CLIENT_IP, ECHO, SERVER_IP, SLEEP, running_mesh

TUNNELS = 160
PUMPS = 8
STALL = 15.0
STUCK = 3


def watch(beat: list[float]) -> None:
    """Exit the process once `beat` (set by the event loop) is `STALL` seconds old."""
    while True:
        time.sleep(1)
        if time.monotonic() - beat[0] > STALL:
            print(f"STUCK: the event loop made no progress for {STALL:.0f} s", flush=True)
            os._exit(STUCK)


async def burst(tmp: Path, transport: str) -> str:
    beat = [time.monotonic()]
    threading.Thread(target=watch, args=(beat,), daemon=True).start()

    async def heartbeat() -> None:
        while True:
            beat[0] = time.monotonic()
            await asyncio.sleep(0.2)

    alive = asyncio.create_task(heartbeat())
    async with running_mesh(tmp, transport=transport) as mesh:
        ctx = mesh.node_a.ctx
        pool = HbonePool(
            ctx.client_context,
            trust_domain="cluster.local",
            cert_for=ctx.certs.get,
            limits=PoolLimits(max_streams=1),
        )
        key = PoolKey(
            source=SpiffeId.parse(SLEEP),
            expected=(SpiffeId.parse(ECHO),),
            address=(SERVER_IP, 15008),
            source_ip=CLIENT_IP,
            transport=transport,
        )
        tunnels: list[asyncio.Task[None]] = []

        async def tunnel() -> None:
            stream = await pool.open_stream(key, f"{SERVER_IP}:{BACKEND_PORT}", [], Sink())
            await asyncio.sleep(0.5)  # held: the next tunnels need connections of their own
            stream.reset()

        async def pump() -> None:
            for _ in range(TUNNELS // PUMPS):
                tunnels.append(asyncio.create_task(tunnel()))
                await asyncio.sleep(0)

        await asyncio.gather(*(pump() for _ in range(PUMPS)))
        await asyncio.wait_for(asyncio.gather(*tunnels), 60)
        pool.close_all()
        opened = pool.connections_opened
    alive.cancel()
    return f"ok: {len(tunnels)} tunnels, {opened} connections"


if __name__ == "__main__":
    print(asyncio.run(burst(Path(sys.argv[1]), sys.argv[2])), flush=True)
