"""Compiling, loading and pinning the capture programs with bcc.

Owns the program source (`programs/capture.c`), its rendering for a node's pin directory, and the
pin names. `compile_and_pin(pin_dir)` is the only place that runs clang/LLVM (~0.7-1 s, ~150 MB
peak): it creates or re-uses the pinned maps (bcc BPF_TABLE_PINNED), loads the SCHED_CLS
programs and pins them, then drops the bcc module. Attaching is done by file descriptors obtained
from the pins (`open_program`), so an agent restart attaches new veths without recompiling.

Invariants: a pin is replaced atomically (pin to `_new`, rename over); a compile or verifier
failure raises `BpfLoadError` and leaves the previous pins untouched. A pinned map is re-used
only if its shape still matches the source: bcc re-uses a pin without checking it, so a `stats`
pin left by an older version with fewer counters is dropped first (counters restart at zero;
`pods` and `ports`, whose layouts have not changed, are never dropped: they hold enrollment).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ebpf.errors import BpfLoadError, NotInstalledError
from ebpf.maps import STATS, map_shape, obj_get, obj_pin

SOURCE = Path(__file__).with_name("programs") / "capture.c"
PROG_POD = "capture_pod"
PROG_UPLINK = "capture_uplink"
PROG_BRIDGE = "capture_bridge"
PROGRAMS = (PROG_POD, PROG_UPLINK, PROG_BRIDGE)
MAPS = ("pods", "config", "stats", "ports")


def render_source(pin_dir: Path) -> str:
    text = str(pin_dir)
    if not pin_dir.is_absolute() or any(c in text for c in '"\\\n'):
        raise BpfLoadError(f"pin directory {text!r} must be an absolute path without quotes")
    return SOURCE.read_text().replace("@PIN_DIR@", text.rstrip("/"))


def compile_and_pin(pin_dir: Path) -> None:
    """Compile + load the programs (maps pinned under `pin_dir`), pin the programs there."""
    from bcc import BPF  # heavy import (LLVM) kept off the module import path

    src = render_source(pin_dir)
    _drop_stale_stats(pin_dir)
    try:
        bpf = BPF(text=src.encode())
    except Exception as exc:  # bcc raises bare Exception on compile errors
        raise BpfLoadError(f"compiling {SOURCE.name}: {exc}") from exc
    try:
        for name in PROGRAMS:
            # On a verifier refusal libbcc writes the verifier log to fd 2 itself.
            try:
                fn = bpf.load_func(name.encode(), BPF.SCHED_CLS)
            except Exception as exc:
                raise BpfLoadError(f"loading {name}: {exc}") from exc
            obj_pin(fn.fd, pin_dir / name)
    finally:
        bpf.cleanup()


def _drop_stale_stats(pin_dir: Path) -> None:
    """Unpin a `stats` map with another number of counters than `STATS` (older version)."""
    path = pin_dir / "stats"
    try:
        shape = map_shape(path)
    except NotInstalledError:
        return
    if shape.max_entries != len(STATS):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def open_program(pin_dir: Path, name: str) -> int:
    """A new fd for a pinned program (caller closes it)."""
    return obj_get(pin_dir / name)


def close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
