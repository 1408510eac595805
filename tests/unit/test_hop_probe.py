"""bench/hop_probe.py's pure parts: the per-request chains of the packet tap and the per-turn
figures from `perf script` text (the measurements themselves need root, perf and the bench)."""

from __future__ import annotations

from bench.harness import BACKEND, SERVICE_VIP
from bench.hop_probe import OURS_B, chains, hop_report, wake_stats

CLIENT = ("127.0.0.1", 40000)
A_SRC = ("127.0.2.10", 50000)  # node A's HBONE connection (source side)
B_SRC = ("127.0.2.10", 51000)  # node B's upstream connection to nginx


def _request(t0: int) -> list[tuple[int, str, int, str, int]]:
    """The six data segments of one request through our pair, 10 us apart from t0 (ns)."""
    segs = [
        (CLIENT, SERVICE_VIP),
        (A_SRC, OURS_B),
        (B_SRC, BACKEND),
        (BACKEND, B_SRC),
        (OURS_B, A_SRC),
        (SERVICE_VIP, CLIENT),
    ]
    return [(t0 + i * 10_000, s[0], s[1], d[0], d[1]) for i, (s, d) in enumerate(segs)]


def test_chains_keep_whole_requests_and_drop_interleaved_ones() -> None:
    first = _request(0)
    # The second request starts before the first one's response left: both are dropped.
    second = _request(1_000_000)
    third = _request(1_030_000)
    fourth = _request(3_000_000)
    got = chains("ztunnel", first + second + third + fourth)
    assert got == [[t for t, *_ in first], [t for t, *_ in fourth]]
    report = hop_report("ztunnel", first + fourth)
    assert report["requests"] == 2
    assert report["A req"]["p50_us"] == 10.0
    assert report["c>A..A>c"]["p50_us"] == 50.0


def test_chains_drop_a_request_with_an_extra_segment() -> None:
    req = _request(0)
    extra = (25_000, *OURS_B, *A_SRC)  # e.g. a WINDOW_UPDATE from B in the middle
    assert chains("ztunnel", [*req, extra]) == []


def _line(tid: int, us: int, kind: str, nr: int, fd: int = 0) -> str:
    t = f"{us / 1e6:.6f}"
    if kind == "enter":
        return f" {tid} {t}: raw_syscalls:sys_enter: NR {nr} ({fd:x}, 0, 0, 0, 0, 0)"
    return f" {tid} {t}:  raw_syscalls:sys_exit: NR {nr} = 1"


def test_wake_stats_splits_turns_at_polls_that_slept() -> None:
    tls, plain = 7, 9
    lines = []
    for base, fd in ((1000, tls), (3000, plain), (5000, tls)):
        lines += [
            _line(1, base - 500, "enter", 281),  # epoll_pwait, sleeps 500 us
            _line(1, base, "exit", 281),
            _line(1, base + 2, "enter", 0, fd),  # read
            _line(1, base + 5, "exit", 0),
            _line(1, base + 6, "enter", 281),  # a poll that returns at once: same turn
            _line(1, base + 7, "exit", 281),
            _line(1, base + 20, "enter", 1, 3),  # write
            _line(1, base + 28, "exit", 1),
        ]
    lines.append(_line(1, 5040, "enter", 281))
    for t in (5100, 5110, 5120):  # fd 7 is the busiest descriptor: the TLS one
        lines += [_line(1, t, "enter", 0, tls), _line(1, t + 1, "exit", 0)]
    stats = wake_stats("\n".join(lines))
    tls_turns = stats["tls turns"]
    assert tls_turns["turns"] == 1  # the last tls turn never ends with a sleeping poll
    assert tls_turns["wake_to_write_us"] == (20.0, 20.0)
    assert tls_turns["read_to_write_us"] == (15.0, 15.0)
    assert tls_turns["write_us"] == (8.0, 8.0)
    assert tls_turns["polls_per_turn"] == 2
    plain_turns = stats["plain turns"]
    assert plain_turns["turns"] == 1
    assert plain_turns["tail_us"] == (1472.0, 1472.0)  # to the next poll that slept
