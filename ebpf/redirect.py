"""Node-level transparent capture: install, enroll, unenroll, and the exact inverse.

Owns everything the kernel needs so that enrolled pods' TCP goes through the node proxy:

* tc programs (`programs/capture.c`) on clsact INGRESS: `capture_pod` on each enrolled or
  observed pod's host-side veth, `capture_uplink` on the node uplink, and `capture_bridge` on
  every bridge device one of those veths is a port of (CNI `bridge` plugin: cni0), discovered
  from the veth's master (no configuration);
* pinned maps under `CaptureConfig.bpffs_dir` (`pods`, `config`, `stats`, `ports`) and pinned
  programs;
* policy routing: `ip rule fwmark MARK/MASK lookup TABLE` (priority `rule_priority`) and, in
  that table, `local 0.0.0.0/0 dev lo scope host`, so packets the programs assigned to a proxy
  socket (and marked) are delivered locally whatever their destination address;
* an nftables table (family ip) with `meta mark & MASK == MARK notrack` in raw prerouting, so
  conntrack/kube-proxy DNAT never rewrites a captured packet (the proxy sees the service VIP).

Every kernel object is created through netlink (pyroute2 for tc/rule/route, pyroute2 nftables
for nft) from sockets opened inside the node's network namespace (`ebpf.netns.entered`).

Invariants:
  * `install()` and `uninstall()` are idempotent; `uninstall()` removes exactly what `install()`
    and `enroll()`/`observe()` created (our filters by name and priority, a clsact qdisc only when
    no other filter is left on it, our rule, our route, our nft table, our pins, the pin dir).
  * `install()` is a full reconcile: it recompiles, re-pins, re-attaches the fresh programs to
    the uplink and to every veth recorded in the pinned `pods` map, and removes our filters from
    interfaces that are no longer recorded. Established flows survive it (the programs are
    stateless; ownership is decided by the kernel's socket tables).
  * Ordering keeps the datapath safe at every step: routing and notrack exist before any program
    can mark a packet; a pod's map entry is written before its filter is attached and removed
    after its filter is detached (so a filter never runs without its entry); for a bridge port,
    the bridge's filter and the port's `ports` entry exist before the veth's filter, and the
    bridge's filter goes only when no recorded port of that bridge is left.
  * The pinned `pods` map is the source of truth for enrollment: a new `NodeCapture` (a new
    process) reads it back, and attaching uses the pinned program (no recompilation).
  * IPv4 only: an IPv6 pod address is refused with EAFNOSUPPORT.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.nftables.expressions import genex
from pyroute2.nftables.main import NFTables

from ebpf import loader
from ebpf.errors import (
    AttachError,
    BpfFsError,
    CaptureError,
    InterfaceNotFoundError,
    NamespaceError,
    NftError,
    NotInstalledError,
    RoutingError,
)
from ebpf.maps import (
    CFG_FAIL_CLOSED,
    CONFIG,
    POD_ENROLLED,
    POD_OBSERVED,
    PodRecord,
    PortRecord,
    decode_pod,
    decode_port,
    encode_pod,
    encode_port,
    open_config,
    open_pods,
    open_ports,
    pod_key,
    port_key,
    read_stats,
)
from ebpf.netns import entered
from meshcore.errors import ConfigError

BPFFS_ROOT = Path("/sys/fs/bpf")
TC_INGRESS = "ffff:fff2"  # clsact ingress parent (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS))
TC_INGRESS_ID = 0xFFFFFFF2
TC_EGRESS_ID = 0xFFFFFFF3
FILTER_POD = "ambient_pod"  # TCA_BPF_NAME of our filters: how we recognise them
FILTER_UPLINK = "ambient_uplink"
FILTER_BRIDGE = "ambient_bridge"
OUR_FILTERS = (FILTER_POD, FILTER_UPLINK, FILTER_BRIDGE)
NFT_CHAIN = "prerouting"
NFT_PRIORITY_RAW = -300  # NF_IP_PRI_RAW: before conntrack (-200) and DNAT (-100)
NFT_META_MARK = 3
RT_SCOPE_HOST = 254
RESERVED_TABLES = frozenset({0, 253, 254, 255})  # unspec, default, main, local


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptureConfig:
    """Per-node capture settings (see docs/ebpf.md)."""

    uplink: str  # node uplink ifname (inbound capture attaches here)
    bpffs_dir: Path = Path("/sys/fs/bpf/ambient")  # per-node pin dir
    mark: int = 0x400  # our own fwmark bit ...
    mark_mask: int = 0x400  # ... and mask (coexists with other marks)
    route_table: int = 100
    rule_priority: int = 100
    outbound_port: int = 15001
    inbound_plaintext_port: int = 15006
    hbone_port: int = 15008
    fail_closed: bool = True  # enrolled pod + no proxy listener -> drop (TC_ACT_SHOT)
    tc_priority: int = 10  # priority of our tc filters (always passed: no duplicates pile up)
    nft_table: str = "ambient_mesh"  # nftables table (family ip) holding the notrack rule

    def __post_init__(self) -> None:
        if not self.uplink:
            raise ConfigError("capture.uplink", "is required")
        if not 0 < self.mark_mask <= 0xFFFFFFFF:
            raise ConfigError("capture.mark_mask", "must be a non-zero 32-bit mask")
        if self.mark & ~self.mark_mask or not self.mark:
            raise ConfigError("capture.mark", "must be non-zero and inside mark_mask")
        if self.route_table in RESERVED_TABLES or not 0 < self.route_table < 2**32:
            raise ConfigError("capture.route_table", "must not be 0/253/254/255")
        if not 0 < self.rule_priority < 32766:  # 32766 = main table rule
            raise ConfigError("capture.rule_priority", "must be in 1..32765")
        for name in ("outbound_port", "inbound_plaintext_port", "hbone_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ConfigError(f"capture.{name}", "must be a TCP port")
        if not 0 < self.tc_priority < 65536:
            raise ConfigError("capture.tc_priority", "must be in 1..65535")
        if not self.bpffs_dir.is_absolute():
            raise ConfigError("capture.bpffs_dir", "must be absolute")
        if not self.nft_table or len(self.nft_table) > 255:
            raise ConfigError("capture.nft_table", "must be a table name")


@dataclass(frozen=True, slots=True, kw_only=True)
class PodEntry:
    """An enrolled pod as recorded in the pinned map."""

    uid: str
    ip: str
    host_ifname: str
    ifindex: int
    bridge_ifindex: int | None = None  # the bridge this veth is a port of (CNI `bridge`), if any


def _ipv4(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError as exc:
        raise CaptureError(f"{ip!r} is not an IP address", errno=errno_mod.EINVAL) from exc
    if addr.version != 4:
        raise CaptureError(f"{ip}: IPv6 capture is not implemented", errno=errno_mod.EAFNOSUPPORT)
    return str(addr)


def _is_bpffs(path: Path) -> bool:
    """Whether `path` lies on a bpf filesystem (longest matching mount in our mount ns)."""
    best, fstype = "", ""
    target = str(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 3:
                continue
            mnt = fields[1].replace("\\040", " ")
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(
                best
            ):
                best, fstype = mnt, fields[2]
    return fstype == "bpf"


def _mount_bpffs(where: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", os.fsencode(where), b"bpf", 0, b"mode=0700") != 0:
        raise BpfFsError(f"mount -t bpf bpf {where}", errno=ctypes.get_errno())


def _filter_name(msg: Any) -> str | None:
    if msg.get_attr("TCA_KIND") != "bpf":
        return None
    opts = msg.get_attr("TCA_OPTIONS")
    name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
    return str(name) if name is not None else None


class NodeCapture:
    """Capture on one node (`netns` = the node's named netns, None = the current one)."""

    def __init__(self, config: CaptureConfig, *, netns: str | None = None) -> None:
        self.config = config
        self.netns = netns

    @property
    def pin_dir(self) -> Path:
        return self.config.bpffs_dir

    # ---------------------------------------------------------------- netlink sockets

    @contextmanager
    def _ipr(self) -> Iterator[Any]:
        with entered(self.netns):
            ipr = IPRoute(groups=0)  # socket bound to the node netns for its whole life
        try:
            yield ipr
        finally:
            ipr.close()

    @contextmanager
    def _nft(self) -> Iterator[Any]:
        with entered(self.netns):
            nft = NFTables(nfgen_family=socket.AF_INET)
        try:
            yield nft
        finally:
            nft.close()

    def _ifindex(self, ipr: Any, ifname: str) -> int:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise InterfaceNotFoundError(
                f"interface {ifname!r} in netns {self.netns or '(current)'}", errno=errno_mod.ENODEV
            )
        return int(found[0])

    # ---------------------------------------------------------------- tc

    def _attach(self, ipr: Any, index: int, prog_fd: int, name: str) -> None:
        try:
            ipr.tc("add", "clsact", index)
        except NetlinkError as exc:
            if exc.code != errno_mod.EEXIST:
                raise AttachError(f"clsact on ifindex {index}", errno=exc.code) from exc
        try:
            # replace-filter swaps the program atomically; prio is always explicit so re-runs
            # replace our filter instead of stacking another one (environment.md).
            ipr.tc(
                "replace-filter",
                "bpf",
                index,
                ":1",
                fd=prog_fd,
                name=name,
                parent=TC_INGRESS,
                classid=1,
                direct_action=True,
                prio=self.config.tc_priority,
            )
        except NetlinkError as exc:
            raise AttachError(f"bpf filter {name} on ifindex {index}", errno=exc.code) from exc

    def _filters(self, ipr: Any, index: int, parent: int) -> list[Any]:
        try:
            return list(ipr.get_filters(index=index, parent=parent))
        except NetlinkError as exc:
            if exc.code in (errno_mod.ENODEV, errno_mod.EINVAL, errno_mod.ENOENT):
                return []
            raise AttachError(f"listing filters on ifindex {index}", errno=exc.code) from exc

    def _detach(self, ipr: Any, index: int, names: tuple[str, ...]) -> bool:
        """Remove our filters (by name) from `index`; drop clsact if nothing else uses it."""
        removed = False
        for msg in self._filters(ipr, index, TC_INGRESS_ID):
            if _filter_name(msg) not in names:
                continue
            prio = (msg["info"] >> 16) & 0xFFFF
            try:
                ipr.tc(
                    "del-filter",
                    "bpf",
                    index,
                    msg["handle"],
                    parent=TC_INGRESS,
                    prio=prio,
                )
                removed = True
            except NetlinkError as exc:
                if exc.code not in (errno_mod.ENOENT, errno_mod.ENODEV, errno_mod.EINVAL):
                    raise AttachError(
                        f"removing filter on ifindex {index}", errno=exc.code
                    ) from exc
        if removed and not (
            self._filters(ipr, index, TC_INGRESS_ID) or self._filters(ipr, index, TC_EGRESS_ID)
        ):
            try:
                ipr.tc("del", "clsact", index)
            except NetlinkError as exc:
                if exc.code not in (errno_mod.ENOENT, errno_mod.EINVAL, errno_mod.ENODEV):
                    raise AttachError(
                        f"removing clsact on ifindex {index}", errno=exc.code
                    ) from exc
        return removed

    def _ours_on(self, ipr: Any) -> dict[int, set[str]]:
        """ifindex -> names of our filters found on it (a scan of every link of the netns)."""
        out: dict[int, set[str]] = {}
        for link in ipr.get_links():
            idx = int(link["index"])
            for msg in self._filters(ipr, idx, TC_INGRESS_ID):
                name = _filter_name(msg)
                if name in OUR_FILTERS:
                    out.setdefault(idx, set()).add(name)
        return out

    # ---------------------------------------------------------------- bridge ports

    def _bridge_of(self, ipr: Any, index: int) -> tuple[int, str] | None:
        """(ifindex, MAC) of the Linux bridge `index` is a port of, or None (routed veth)."""
        try:
            (link,) = ipr.get_links(index)
            master = link.get_attr("IFLA_MASTER")
            if not master:
                return None
            (dev,) = ipr.get_links(int(master))
        except NetlinkError as exc:
            raise InterfaceNotFoundError(
                f"ifindex {index} or its master in netns {self.netns or '(current)'}",
                errno=exc.code,
            ) from exc
        info = dev.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "bridge":
            return None  # another kind of master (vrf, bond): not a bridge port
        return int(master), str(dev.get_attr("IFLA_ADDRESS"))

    def _sync_port(self, ipr: Any, index: int, bridge_fd: int | None) -> int | None:
        """Record (or forget) veth `index` as a bridge port; attach `capture_bridge` to its
        bridge first. Returns the bridge's ifindex, or None for a routed veth."""
        bridge = self._bridge_of(ipr, index)
        try:
            ports = open_ports(self.pin_dir)
        except NotInstalledError:
            if bridge is None:
                return None  # pins of an older version: no bridge support needed here
            raise
        with ports:
            if bridge is None:
                ports.delete(port_key(index))
                return None
            bridge_index, mac = bridge
            if bridge_fd is not None:
                self._attach(ipr, bridge_index, bridge_fd, FILTER_BRIDGE)
            else:
                fd = loader.open_program(self.pin_dir, loader.PROG_BRIDGE)
                try:
                    self._attach(ipr, bridge_index, fd, FILTER_BRIDGE)
                finally:
                    loader.close_fd(fd)
            ports.update(port_key(index), encode_port(bridge_ifindex=bridge_index, mac=mac))
            return bridge_index

    def _ports(self) -> dict[int, PortRecord]:
        """veth ifindex -> its `ports` entry."""
        try:
            ports = open_ports(self.pin_dir)
        except NotInstalledError:
            return {}
        with ports:
            out = {}
            for key in ports.all_keys():
                value = ports.lookup(key)
                if value is not None:
                    rec = decode_port(key, value)
                    out[rec.ifindex] = rec
            return out

    # ---------------------------------------------------------------- routing

    def _our_rules(self, ipr: Any) -> list[Any]:
        c = self.config
        out = []
        for r in ipr.get_rules(family=socket.AF_INET):
            table = r.get_attr("FRA_TABLE") or r["table"]
            if (
                r.get_attr("FRA_PRIORITY") == c.rule_priority
                and r.get_attr("FRA_FWMARK") == c.mark
                and r.get_attr("FRA_FWMASK") == c.mark_mask
                and table == c.route_table
            ):
                out.append(r)
        return out

    def _ensure_routing(self, ipr: Any) -> None:
        c = self.config
        lo = self._ifindex(ipr, "lo")
        try:
            ipr.route(
                "replace",
                dst="0.0.0.0/0",
                type="local",
                oif=lo,
                table=c.route_table,
                scope=RT_SCOPE_HOST,  # required for a local route (else EINVAL)
                family=socket.AF_INET,
            )
        except NetlinkError as exc:
            raise RoutingError(
                f"local default route in table {c.route_table}", errno=exc.code
            ) from exc
        if self._our_rules(ipr):
            return
        try:
            ipr.rule(
                "add",
                fwmark=c.mark,
                fwmask=c.mark_mask,
                table=c.route_table,
                priority=c.rule_priority,
                family=socket.AF_INET,
            )
        except NetlinkError as exc:
            if exc.code != errno_mod.EEXIST:
                raise RoutingError(
                    f"rule fwmark {c.mark:#x}/{c.mark_mask:#x} lookup {c.route_table}",
                    errno=exc.code,
                ) from exc

    def _remove_routing(self, ipr: Any) -> None:
        c = self.config
        for _ in range(16):  # duplicates could exist if someone else added the same rule
            if not self._our_rules(ipr):
                break
            try:
                ipr.rule(
                    "del",
                    fwmark=c.mark,
                    fwmask=c.mark_mask,
                    table=c.route_table,
                    priority=c.rule_priority,
                    family=socket.AF_INET,
                )
            except NetlinkError as exc:
                if exc.code != errno_mod.ENOENT:
                    raise RoutingError("removing the fwmark rule", errno=exc.code) from exc
                break
        try:
            ipr.route(
                "del",
                dst="0.0.0.0/0",
                type="local",
                table=c.route_table,
                scope=RT_SCOPE_HOST,
                family=socket.AF_INET,
            )
        except NetlinkError as exc:
            if exc.code not in (errno_mod.ESRCH, errno_mod.ENOENT):
                raise RoutingError("removing the local route", errno=exc.code) from exc

    # ---------------------------------------------------------------- nftables

    def _notrack_expressions(self) -> list[list[dict[str, Any]]]:
        """`meta mark & MASK == MARK notrack` (marks are host byte order in nft registers)."""
        c = self.config
        value = {"attrs": [("NFTA_DATA_VALUE", struct.pack("=I", c.mark))]}
        return [
            [genex("meta", {"key": NFT_META_MARK, "dreg": 1})],
            [
                genex(
                    "bitwise",
                    {
                        "sreg": 1,
                        "dreg": 1,
                        "len": 4,
                        "mask": {"attrs": [("NFTA_DATA_VALUE", struct.pack("=I", c.mark_mask))]},
                        "xor": {"attrs": [("NFTA_DATA_VALUE", b"\0\0\0\0")]},
                    },
                )
            ],
            [genex("cmp", {"sreg": 1, "op": 0, "data": value})],
            [{"attrs": [("NFTA_EXPR_NAME", "notrack")]}],
        ]

    def _rule_matches(self, rule: Any) -> bool:
        c = self.config
        mask = data = None
        names = []
        for expr in rule.get_attr("NFTA_RULE_EXPRESSIONS") or []:
            name = expr.get_attr("NFTA_EXPR_NAME")
            names.append(name)
            d = expr.get_attr("NFTA_EXPR_DATA")
            if name == "bitwise" and d is not None:
                mask = d.get_attr("NFTA_BITWISE_MASK").get_attr("NFTA_DATA_VALUE")
            elif name == "cmp" and d is not None:
                data = d.get_attr("NFTA_CMP_DATA").get_attr("NFTA_DATA_VALUE")
        return (
            names == ["meta", "bitwise", "cmp", "notrack"]
            and mask == struct.pack("=I", c.mark_mask)
            and data == struct.pack("=I", c.mark)
        )

    def _ensure_nft(self) -> None:
        t = self.config.nft_table
        try:
            with self._nft() as nft:
                nft.table("add", name=t)  # NEWTABLE/NEWCHAIN without EXCL: no-ops if present
                nft.chain(
                    "add",
                    table=t,
                    name=NFT_CHAIN,
                    hook="prerouting",
                    type="filter",
                    priority=NFT_PRIORITY_RAW,
                )
                rules = [
                    r
                    for r in nft.get_rules()
                    if r.get_attr("NFTA_RULE_TABLE") == t
                    and r.get_attr("NFTA_RULE_CHAIN") == NFT_CHAIN
                ]
                keep = next((r for r in rules if self._rule_matches(r)), None)
                if keep is None:  # add the new rule before removing stale ones: no gap
                    nft.rule(
                        "add", table=t, chain=NFT_CHAIN, expressions=self._notrack_expressions()
                    )
                for r in rules:
                    if r is not keep:
                        nft.rule(
                            "del", table=t, chain=NFT_CHAIN, handle=r.get_attr("NFTA_RULE_HANDLE")
                        )
        except NetlinkError as exc:
            raise NftError(f"nft table ip {t}", errno=exc.code) from exc

    def _remove_nft(self) -> None:
        t = self.config.nft_table
        try:
            with self._nft() as nft:
                if any(x.get_attr("NFTA_TABLE_NAME") == t for x in nft.get_tables()):
                    nft.table("del", name=t)
        except NetlinkError as exc:
            if exc.code != errno_mod.ENOENT:
                raise NftError(f"removing nft table ip {t}", errno=exc.code) from exc

    # ---------------------------------------------------------------- maps

    def _write_config(self) -> None:
        c = self.config
        flags = CFG_FAIL_CLOSED if c.fail_closed else 0
        value = CONFIG.pack(
            c.mark, c.mark_mask, c.outbound_port, c.inbound_plaintext_port, c.hbone_port, flags
        )
        with open_config(self.pin_dir) as m:
            m.update(struct.pack("=I", 0), value)

    def _records(self) -> list[PodRecord]:
        try:
            pods = open_pods(self.pin_dir)
        except NotInstalledError:
            return []
        with pods:
            out = []
            for key in pods.all_keys():
                value = pods.lookup(key)
                if value is not None:
                    out.append(decode_pod(key, value))
            return out

    # ---------------------------------------------------------------- public API

    def install(self) -> None:
        """Compile+load+pin, routing, notrack, uplink filter, re-attach recorded pods."""
        c = self.config
        if not _is_bpffs(self.pin_dir):
            if self.pin_dir == BPFFS_ROOT or BPFFS_ROOT in self.pin_dir.parents:
                _mount_bpffs(BPFFS_ROOT)
            else:
                raise BpfFsError(
                    f"{self.pin_dir} is not on a bpf filesystem", errno=errno_mod.ENOTSUP
                )
        try:
            self.pin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise BpfFsError(f"creating {self.pin_dir}", errno=exc.errno) from exc
        loader.compile_and_pin(self.pin_dir)
        self._write_config()
        with self._ipr() as ipr:
            uplink = self._ifindex(ipr, c.uplink)
            self._ensure_routing(ipr)
            self._ensure_nft()
            fd = loader.open_program(self.pin_dir, loader.PROG_UPLINK)
            try:
                self._attach(ipr, uplink, fd, FILTER_UPLINK)
            finally:
                loader.close_fd(fd)
            veths: set[int] = set()
            bridges: set[int] = set()
            fd = loader.open_program(self.pin_dir, loader.PROG_POD)
            bridge_fd = loader.open_program(self.pin_dir, loader.PROG_BRIDGE)
            try:
                links = {
                    int(link["index"]): link.get_attr("IFLA_IFNAME") for link in ipr.get_links()
                }
                for rec in self._records():
                    # A recorded veth that is gone (pod deleted while no agent ran) is left for
                    # the agent's reconcile to unenroll; never attach to a reused index.
                    if links.get(rec.ifindex) == rec.ifname and rec.ifindex not in veths:
                        # Bridge filter + port entry (the bridge's MAC, re-read) before the
                        # veth's filter, which relies on them.
                        bridge = self._sync_port(ipr, rec.ifindex, bridge_fd)
                        if bridge is not None:
                            bridges.add(bridge)
                        self._attach(ipr, rec.ifindex, fd, FILTER_POD)
                        veths.add(rec.ifindex)
            finally:
                loader.close_fd(fd)
                loader.close_fd(bridge_fd)
            with open_ports(self.pin_dir) as ports:
                for idx in set(self._ports()) - veths:
                    ports.delete(port_key(idx))  # veth no longer recorded or gone
            for idx, names in self._ours_on(ipr).items():
                keep = {
                    FILTER_UPLINK: idx == uplink,
                    FILTER_POD: idx in veths,
                    FILTER_BRIDGE: idx in bridges,
                }
                stale = tuple(n for n in names if not keep[n])
                if stale:
                    self._detach(ipr, idx, stale)

    def uninstall(self) -> None:
        """Exact inverse of install() + every enroll()/observe(); idempotent."""
        try:
            with self._ipr() as ipr:
                for idx in self._ours_on(ipr):
                    self._detach(ipr, idx, OUR_FILTERS)
                self._remove_routing(ipr)
            self._remove_nft()
        except NamespaceError as exc:
            if exc.errno != errno_mod.ENOENT:  # netns gone: so is everything that lived in it
                raise
        for name in (*loader.PROGRAMS, *loader.MAPS):
            for path in (self.pin_dir / name, self.pin_dir / f"{name}_new"):
                with suppress(FileNotFoundError):
                    path.unlink()
        with suppress(FileNotFoundError):
            try:
                self.pin_dir.rmdir()
            except OSError as exc:
                if exc.errno != errno_mod.ENOENT:
                    raise BpfFsError(f"removing {self.pin_dir}", errno=exc.errno) from exc

    def _record(self, *, uid: str, ip: str, host_ifname: str, flags: int) -> PodEntry:
        ip = _ipv4(ip)
        with self._ipr() as ipr:
            index = self._ifindex(ipr, host_ifname)
            fd = loader.open_program(self.pin_dir, loader.PROG_POD)
            try:
                bridge = self._sync_port(ipr, index, None)  # before the veth's filter
                with open_pods(self.pin_dir) as pods:
                    value = encode_pod(ifindex=index, flags=flags, ifname=host_ifname, uid=uid)
                    pods.update(pod_key(ip), value)  # entry first: the filter reads it
                self._attach(ipr, index, fd, FILTER_POD)
            finally:
                loader.close_fd(fd)
        return PodEntry(
            uid=uid, ip=ip, host_ifname=host_ifname, ifindex=index, bridge_ifindex=bridge
        )

    def enroll(self, *, uid: str, ip: str, host_ifname: str) -> PodEntry:
        """Capture the pod at `ip` behind `host_ifname` (idempotent; upgrades an observed pod)."""
        return self._record(uid=uid, ip=ip, host_ifname=host_ifname, flags=POD_ENROLLED)

    def observe(self, *, ip: str, host_ifname: str) -> None:
        """Attach to a NON-enrolled pod's veth: anti-spoofing, and capture of its connections to
        enrolled pods on this node (-> inbound listeners) plus the replies to the proxy's
        transparent connections toward it. Its other traffic passes untouched. On an enrolled
        pod this releases it from the mesh (entry flag changes in place, filter stays)."""
        self._record(uid="", ip=ip, host_ifname=host_ifname, flags=POD_OBSERVED)

    def unenroll(self, *, ip: str) -> None:
        """Forget the pod at `ip` (enrolled or observed): filter off its veth, entry removed."""
        ip = _ipv4(ip)
        try:
            pods = open_pods(self.pin_dir)
        except NotInstalledError:
            return
        with pods:
            raw = pods.lookup(pod_key(ip))
            if raw is None:
                return
            rec = decode_pod(pod_key(ip), raw)
            others = [
                k
                for k in pods.all_keys()
                if k != pod_key(ip)
                and (v := pods.lookup(k)) is not None
                and decode_pod(k, v).ifindex == rec.ifindex
            ]
            if not others:  # another IP still recorded on this veth keeps the filter
                with self._ipr() as ipr:
                    link = ipr.link_lookup(ifname=rec.ifname)
                    if link and int(link[0]) == rec.ifindex:
                        self._detach(ipr, rec.ifindex, (FILTER_POD,))
                    self._forget_port(ipr, rec.ifindex)
            pods.delete(pod_key(ip))

    def _forget_port(self, ipr: Any, index: int) -> None:
        """Drop veth `index`'s `ports` entry (its filter is off); the bridge's filter goes with
        the last recorded port of that bridge."""
        port = self._ports().get(index)
        if port is None:
            return
        with open_ports(self.pin_dir) as ports:
            ports.delete(port_key(index))
        if not any(p.bridge_ifindex == port.bridge_ifindex for p in self._ports().values()):
            self._detach(ipr, port.bridge_ifindex, (FILTER_BRIDGE,))

    def _by_flag(self, flag: int) -> dict[str, PodEntry]:
        ports = self._ports()
        return {
            r.ip: PodEntry(
                uid=r.uid,
                ip=r.ip,
                host_ifname=r.ifname,
                ifindex=r.ifindex,
                bridge_ifindex=p.bridge_ifindex if (p := ports.get(r.ifindex)) else None,
            )
            for r in self._records()
            if r.flags & flag
        }

    def enrolled(self) -> dict[str, PodEntry]:
        """Enrolled pods, read back from the PINNED map (survives agent restarts)."""
        return self._by_flag(POD_ENROLLED)

    def observed(self) -> dict[str, PodEntry]:
        """Observed (non-mesh) pods, read back from the pinned map."""
        return self._by_flag(POD_OBSERVED)

    def stats(self) -> dict[str, int]:
        """Datapath counters (captures, established hand-offs, drops by reason)."""
        return read_stats(self.pin_dir)
