"""Transparent capture for ambient-mesh: tc eBPF programs that steer pod TCP to the node proxy.

Public API: `ebpf.redirect` (`CaptureConfig`, `PodEntry`, `NodeCapture`) and `ebpf.errors`.
Internals: `ebpf.loader` (bcc compile + pin), `ebpf.maps` (pinned maps via libbpf), `ebpf.netns`
(per-thread setns), `ebpf/programs/capture.c` (the programs). See docs/ebpf.md.

Nothing is imported here eagerly: bcc/LLVM is loaded only when programs are compiled.
"""
