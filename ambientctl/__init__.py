"""ambientctl: the operator CLI (install/manifest, analyze, ztunnel-config, proxy-status,
waypoint, lab, completion). It reads admin and debug endpoints and never writes to a cluster
without being asked. `lab/` is the single-machine lab (docs/lab.md).
"""
