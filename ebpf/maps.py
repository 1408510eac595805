"""Pinned BPF maps and programs, read and written from Python through libbpf (ctypes).

Owns the byte layout shared with `programs/capture.c` (keep both in sync):

  pods    hash   key u32 IPv4 (network order) -> struct pod_entry {u32 ifindex; u32 flags;
                 char ifname[16]; char uid[64]}                       (88 bytes)
  config  array  [0] -> struct capture_config {u32 mark, mask, outbound_port, inbound_port,
                 hbone_port, flags}                                     (24 bytes)
  stats   percpu array of u64 counters, index = `STATS` position
  ports   hash   key u32 veth ifindex -> struct port_entry {u32 bridge_ifindex; u8 mac[6];
                 u16 pad} (12 bytes): pod veths that are ports of a bridge, and that bridge's MAC

Maps are opened from their bpffs pins with BPF_OBJ_GET, so any process (a restarted agent) sees
what a previous one wrote, without compiling anything. libbpf >= 1.0 returns -errno, which is
carried in the raised `MapError` / `NotInstalledError`.

Invariants: a record whose size differs from the layout above is refused (MapError), never
half-decoded; strings are NUL-padded and must fit (ifname <= 15 bytes, uid <= 63 bytes).
`STATS` only ever grows at the end (old indexes keep their meaning).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errno_mod
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ebpf.errors import BpfLoadError, MapError, NotInstalledError

POD_ENROLLED = 1
POD_OBSERVED = 2
CFG_FAIL_CLOSED = 1

POD_ENTRY = struct.Struct("=II16s64s")
PORT_ENTRY = struct.Struct("=I6s2x")
IFINDEX = struct.Struct("=I")
CONFIG = struct.Struct("=IIIIII")
KEY = struct.Struct("=4s")  # IPv4 address as on the wire

# Index order of `enum stat_index` in capture.c.
STATS = (
    "outbound",
    "inbound",
    "hbone",
    "established",
    "spoof_drop",
    "no_listener_drop",
    "no_listener_pass",
    "assign_error",
    "bridge",
)

BPF_ANY = 0

_bpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
_bpf.bpf_obj_get.argtypes = [ctypes.c_char_p]
_bpf.bpf_obj_get.restype = ctypes.c_int
_bpf.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
_bpf.bpf_obj_pin.restype = ctypes.c_int
_bpf.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_bpf.bpf_map_lookup_elem.restype = ctypes.c_int
_bpf.bpf_map_update_elem.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_uint64,
]
_bpf.bpf_map_update_elem.restype = ctypes.c_int
_bpf.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
_bpf.bpf_map_delete_elem.restype = ctypes.c_int
_bpf.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_bpf.bpf_map_get_next_key.restype = ctypes.c_int
_bpf.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_bpf.bpf_obj_get_info_by_fd.restype = ctypes.c_int


def _err(ret: int) -> int:
    """libbpf 1.x returns -errno; older conventions return -1 and set errno."""
    return -ret if ret < -1 else (ctypes.get_errno() or errno_mod.EIO)


def obj_get(path: Path) -> int:
    """File descriptor of a pinned object (BPF_OBJ_GET). Missing pin -> NotInstalledError."""
    fd = _bpf.bpf_obj_get(os.fsencode(path))
    if fd < 0:
        code = _err(fd)
        cls = NotInstalledError if code == errno_mod.ENOENT else MapError
        raise cls(f"bpf_obj_get({path})", errno=code)
    return int(fd)


def obj_pin(fd: int, path: Path) -> None:
    """Pin `fd` at `path` atomically: pin under a temporary name, then rename over the old pin.

    bpffs refuses names containing '.' (EPERM from its lookup), hence the `_new` suffix."""
    tmp = path.with_name(path.name + "_new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    ret = _bpf.bpf_obj_pin(fd, os.fsencode(tmp))
    if ret < 0:
        raise BpfLoadError(f"bpf_obj_pin({tmp})", errno=_err(ret))
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BpfLoadError(f"rename pin {tmp} -> {path}", errno=exc.errno) from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class MapShape:
    """The part of `struct bpf_map_info` (uapi/linux/bpf.h) that says whether a pin fits."""

    map_type: int
    key_size: int
    value_size: int
    max_entries: int


def map_shape(path: Path) -> MapShape:
    """Type and sizes of the map pinned at `path` (BPF_OBJ_GET_INFO_BY_FD)."""
    fd = obj_get(path)
    try:
        # struct bpf_map_info starts with u32 type, id, key_size, value_size, max_entries.
        info = ctypes.create_string_buffer(80)
        size = ctypes.c_uint32(len(info))
        ret = _bpf.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size))
        if ret < 0:
            raise MapError(f"bpf_obj_get_info_by_fd({path})", errno=_err(ret))
        map_type, _id, key_size, value_size, max_entries = struct.unpack_from("=5I", info.raw)
        return MapShape(
            map_type=map_type, key_size=key_size, value_size=value_size, max_entries=max_entries
        )
    finally:
        os.close(fd)


def possible_cpus() -> int:
    """Number of possible CPUs: the per-CPU value count of percpu maps (kernel ABI)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    top = 0
    for part in text.split(","):
        top = max(top, int(part.split("-")[-1]))
    return top + 1


class PinnedMap:
    """A BPF map opened from its pin. Use as a context manager (closes the fd)."""

    def __init__(self, path: Path, *, key_size: int, value_size: int) -> None:
        self.path = path
        self.key_size = key_size
        self.value_size = value_size
        self.fd = obj_get(path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedMap:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.key_size:
            raise MapError(f"{self.path.name}: key of {len(key)} bytes, want {self.key_size}")
        return ctypes.create_string_buffer(key, self.key_size)

    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self.value_size)
        ret = _bpf.bpf_map_lookup_elem(self.fd, self._key(key), value)
        if ret < 0:
            code = _err(ret)
            if code == errno_mod.ENOENT:
                return None
            raise MapError(f"{self.path.name}: lookup", errno=code)
        return value.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self.value_size:
            raise MapError(f"{self.path.name}: value of {len(value)} bytes, want {self.value_size}")
        buf = ctypes.create_string_buffer(value, self.value_size)
        ret = _bpf.bpf_map_update_elem(self.fd, self._key(key), buf, flags)
        if ret < 0:
            raise MapError(f"{self.path.name}: update", errno=_err(ret))

    def delete(self, key: bytes) -> bool:
        """True if an entry was removed; False if there was none."""
        ret = _bpf.bpf_map_delete_elem(self.fd, self._key(key))
        if ret < 0:
            code = _err(ret)
            if code == errno_mod.ENOENT:
                return False
            raise MapError(f"{self.path.name}: delete", errno=code)
        return True

    def all_keys(self) -> Iterator[bytes]:
        """All keys (snapshot walk with BPF_MAP_GET_NEXT_KEY; concurrent deletes are tolerated)."""
        cur: ctypes.Array[ctypes.c_char] | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        seen: list[bytes] = []
        while True:
            ret = _bpf.bpf_map_get_next_key(self.fd, cur, nxt)
            if ret < 0:
                code = _err(ret)
                if code == errno_mod.ENOENT:
                    break
                raise MapError(f"{self.path.name}: get_next_key", errno=code)
            seen.append(nxt.raw)
            cur = ctypes.create_string_buffer(nxt.raw, self.key_size)
        yield from seen


@dataclass(frozen=True, slots=True, kw_only=True)
class PodRecord:
    """One decoded `pods` map entry."""

    ip: str
    ifindex: int
    flags: int
    ifname: str
    uid: str


def pod_key(ip: str) -> bytes:
    return socket.inet_aton(ip)


def encode_pod(*, ifindex: int, flags: int, ifname: str, uid: str) -> bytes:
    name_b, uid_b = ifname.encode(), uid.encode()
    if len(name_b) > 15:
        raise MapError(f"interface name {ifname!r} longer than 15 bytes")
    if len(uid_b) > 63:
        raise MapError(f"pod uid {uid!r} longer than 63 bytes")
    return POD_ENTRY.pack(ifindex, flags, name_b, uid_b)


def decode_pod(key: bytes, value: bytes) -> PodRecord:
    if len(key) != KEY.size or len(value) != POD_ENTRY.size:
        raise MapError(f"pods entry of {len(key)}/{len(value)} bytes does not match the layout")
    ifindex, flags, name_b, uid_b = POD_ENTRY.unpack(value)
    return PodRecord(
        ip=socket.inet_ntoa(key),
        ifindex=ifindex,
        flags=flags,
        ifname=name_b.rstrip(b"\0").decode(errors="replace"),
        uid=uid_b.rstrip(b"\0").decode(errors="replace"),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PortRecord:
    """One decoded `ports` map entry: a pod veth that is a port of a bridge."""

    ifindex: int
    bridge_ifindex: int
    mac: str  # the bridge's MAC, aa:bb:cc:dd:ee:ff


def port_key(ifindex: int) -> bytes:
    return IFINDEX.pack(ifindex)


def encode_port(*, bridge_ifindex: int, mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise MapError(f"bridge MAC {mac!r} is not a 6-byte Ethernet address")
    return PORT_ENTRY.pack(bridge_ifindex, raw)


def decode_port(key: bytes, value: bytes) -> PortRecord:
    if len(key) != IFINDEX.size or len(value) != PORT_ENTRY.size:
        raise MapError(f"ports entry of {len(key)}/{len(value)} bytes does not match the layout")
    bridge_ifindex, raw = PORT_ENTRY.unpack(value)
    return PortRecord(
        ifindex=IFINDEX.unpack(key)[0],
        bridge_ifindex=bridge_ifindex,
        mac=":".join(f"{b:02x}" for b in raw),
    )


def open_ports(pin_dir: Path) -> PinnedMap:
    return PinnedMap(pin_dir / "ports", key_size=IFINDEX.size, value_size=PORT_ENTRY.size)


def open_pods(pin_dir: Path) -> PinnedMap:
    return PinnedMap(pin_dir / "pods", key_size=KEY.size, value_size=POD_ENTRY.size)


def open_config(pin_dir: Path) -> PinnedMap:
    return PinnedMap(pin_dir / "config", key_size=4, value_size=CONFIG.size)


def read_stats(pin_dir: Path) -> dict[str, int]:
    """Counters summed over CPUs."""
    ncpu = possible_cpus()
    with PinnedMap(pin_dir / "stats", key_size=4, value_size=8 * ncpu) as m:
        out: dict[str, int] = {}
        for i, name in enumerate(STATS):
            raw = m.lookup(struct.pack("=I", i)) or b""
            out[name] = sum(v for (v,) in struct.iter_unpack("=Q", raw))
        return out
