"""The CLI's non-lab commands: argument parsing and dispatch (the `lab` group is in main.py).

Owns each command's flags, help text and exit status; the work is in `install`, `analyze`,
`ztunnelconfig`, `proxystatus`, `admin` and `completion`. Output goes to stdout (data) and
stderr (progress, summaries), so `-o json` output pipes cleanly.

Exit statuses (istioctl's, istioctl/cmd/sysexits.go): 0 ok; 1 generic failure; 2 usage
error (argparse); 79 `analyze` found problems at or above --failure-threshold (istioctl's
``ExitAnalyzerFoundIssues``); 5 no cluster (`install`); `x precheck` 1 if a check failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ambientctl import admin, analyze, completion, output, precheck, proxystatus, ztunnelconfig
from ambientctl import install as installer
from ambientctl import waypoint as waypoint_cmd
from ambientctl.errors import CtlError
from controlplane.translate import TranslateOptions
from meshcore.telemetry import version

ANALYZE_FOUND = 79
"""istioctl's ``ExitAnalyzerFoundIssues`` (istioctl/cmd/sysexits.go), so CI scripts written for
istioctl read the result the same way."""


def _release(args: argparse.Namespace) -> installer.ChartRelease:
    """The options `_chart_flags` adds."""
    return installer.ChartRelease(
        chart=args.chart,
        namespace=args.namespace,
        release=args.release,
        values=tuple(args.values),
        sets=tuple(args.sets),
    )


def _chart_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chart", type=Path, help="chart directory (default: charts/ambient)")
    p.add_argument("-n", "--namespace", default=installer.NAMESPACE, help="install namespace")
    p.add_argument("--release", default=installer.RELEASE, help="helm release name")
    p.add_argument(
        "-f", "--values", type=Path, action="append", default=[], help="values file (repeatable)"
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a chart value (repeatable), e.g. --set cni.enabled=false",
    )


def _target_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a node proxy's admin endpoint (default 127.0.0.1:15000; repeatable)",
    )
    p.add_argument(
        "--file",
        action="append",
        type=Path,
        default=[],
        help="a saved /config_dump instead of a live proxy (repeatable)",
    )
    p.add_argument("--lab", metavar="NAME", help="the node proxies of a running lab")
    p.add_argument("--node", help="with --lab: only this node")
    p.add_argument("-o", "--output", choices=output.FORMATS, default="table")


def register(sub: Any) -> None:
    """Add the commands to the top-level subparsers of `ambientctl`."""
    inst = sub.add_parser(
        "install",
        help="install or upgrade the mesh in the current cluster",
        description="Runs `helm upgrade --install` of the chart into the "
        "cluster of the current kubectl context.",
    )
    _chart_flags(inst)
    inst.add_argument("--no-wait", action="store_true", help="do not wait for rollout")

    man = sub.add_parser("manifest", help="render the mesh's manifests")
    mcmd = man.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = mcmd.add_parser("generate", help="render the chart offline (helm template) to stdout")
    _chart_flags(gen)
    gen.add_argument("--kube-version", default="1.33.0", help="Kubernetes version to render for")

    an = sub.add_parser(
        "analyze",
        help="find configuration problems in manifests",
        description=analyze.__doc__.split("\n\n")[0] if analyze.__doc__ else None,
        epilog="codes: AMB0001 unreadable object, AMB0101 namespace labelled but "
        "pod not captured, AMB0102 missing waypoint, AMB0103 L7 rules at a node "
        "proxy, AMB0104 conflicting VirtualServices, AMB0105 STRICT with non-mesh "
        "clients, AMB0106 unreadable policy (fail-closed), AMB0100 other",
    )
    an.add_argument("paths", nargs="*", type=Path, help="manifest files or directories")
    an.add_argument(
        "-d",
        "--dir",
        type=Path,
        action="append",
        default=[],
        help="a directory of manifests (repeatable)",
    )
    an.add_argument(
        "--lab",
        metavar="NAME",
        help="analyze a running lab: its manifests and live pod redirection",
    )
    an.add_argument(
        "-o",
        "--output",
        choices=("log", "short", "text", "json", "yaml"),
        default="log",
        help="log (istioctl's default; also short/text): one line per message",
    )
    an.add_argument(
        "--failure-threshold",
        choices=analyze.LEVELS,
        default="Warning",
        help="exit 79 (as istioctl) if a message at or above this level is found (default Warning)",
    )
    an.add_argument("--root-namespace", default="istio-system")
    _namespace_flags(an, default=None)

    zc = sub.add_parser(
        "ztunnel-config",
        aliases=["zc"],
        help="what a node proxy has: workloads, services, policies, certificates",
    )
    zc.add_argument("section", type=ztunnelconfig.section_name, choices=ztunnelconfig.CLI_SECTIONS)
    _target_flags(zc)
    _namespace_flags(zc, default=None)

    ps = sub.add_parser(
        "proxy-status",
        aliases=["ps"],
        help="node proxies vs the control plane (synced, stale, NACKed)",
    )
    ps.add_argument(
        "--controlplane",
        default=admin.DEBUG_ADDRESS,
        metavar="HOST:PORT",
        help="the control plane's debug endpoint (default 127.0.0.1:15014)",
    )
    _target_flags(ps)
    ps.set_defaults(address=[])

    ver = sub.add_parser("version", help="client and control plane versions")
    ver.add_argument(
        "--remote",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also ask the control plane (default on)",
    )
    ver.add_argument("--controlplane", default=admin.DEBUG_ADDRESS, metavar="HOST:PORT")
    ver.add_argument("--lab", metavar="NAME", help="the control plane of a running lab")
    ver.add_argument("-o", "--output", choices=("short", "json", "yaml"), default="short")

    x = sub.add_parser("x", aliases=["experimental"], help="experimental commands")
    xcmds = x.add_subparsers(dest="x_command", required=True, metavar="COMMAND")
    pre = xcmds.add_parser(
        "precheck",
        help="can this node and cluster run the mesh (kernel, eBPF, CNI; Kubernetes version, "
        "RBAC, conflicting installs and CRDs)",
    )
    pre.add_argument("--cni-conf-dir", type=Path, default=Path("/etc/cni/net.d"))
    pre.add_argument("--proc", type=Path, default=Path("/proc"), help=argparse.SUPPRESS)
    pre.add_argument(
        "-n", "--namespace", default=installer.NAMESPACE, help="the install namespace (RBAC)"
    )
    pre.add_argument("--release", default=installer.RELEASE, help="helm release name (CRDs)")
    pre.add_argument("-o", "--output", choices=("short", "json", "yaml"), default="short")

    waypoint_cmd.register(sub)
    comp = sub.add_parser("completion", help="shell completion script")
    comp.add_argument("shell", choices=("bash", "zsh"))


def _namespace_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    """istioctl's ``-n/--namespace`` and ``-A/--all-namespaces``."""
    p.add_argument("-n", "--namespace", default=default, help="only this namespace")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _analyze(args: argparse.Namespace) -> int:
    paths = [*args.paths, *args.dir]
    live = None
    if args.lab:
        from ambientctl.lab.lab import Lab

        lab = Lab(args.lab)
        lab.load()
        paths.append(lab.paths.manifests)
        live = {f"{r['namespace']}/{r['name']}": _redirection(r) for r in lab.pods()}
    if not paths:
        raise CtlError("nothing to analyze: give manifest files/directories, -d DIR or --lab NAME")
    inp = analyze.load(paths, live)
    msgs = analyze.analyze(inp, TranslateOptions(root_namespace=args.root_namespace))
    if args.namespace and not args.all_namespaces:  # istioctl's -n (default: every namespace)
        msgs = [m for m in msgs if analyze.message_namespace(m.ref) in (args.namespace, None)]
    if args.output in ("log", "short", "text"):
        for m in msgs:
            _out(m.render())
        where = ", ".join(map(str, paths))
        if not msgs:
            print(f"\u2714 No validation issues found when analyzing {where}.", file=sys.stderr)
        else:
            counts = {lvl: sum(m.level == lvl for m in msgs) for lvl in analyze.LEVELS}
            print(
                f"{len(msgs)} message(s) for {where}: "
                + ", ".join(f"{n} {lvl}" for lvl, n in counts.items() if n),
                file=sys.stderr,
            )
    else:
        _out(output.document([m.to_dict() for m in msgs], args.output))
    threshold = analyze.LEVELS.index(args.failure_threshold)
    return ANALYZE_FOUND if any(m.level_rank >= threshold for m in msgs) else 0


def _redirection(row: dict[str, Any]) -> str:
    value = str(row.get("redirection", ""))
    return "" if value == "-" else value


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    group = args.group
    if group == "install":
        ctx = installer.current_context(args.context, args.kubeconfig)
        print(
            f"installing into the cluster of context {ctx!r}, namespace {args.namespace}",
            file=sys.stderr,
        )
        _out(
            installer.install(
                _release(args),
                wait=not args.no_wait,
                context=ctx,
                kubeconfig=args.kubeconfig,
            )
        )
        return 0
    if group == "manifest":
        _out(installer.generate(_release(args), kube_version=args.kube_version))
        return 0
    if group == "analyze":
        return _analyze(args)
    if group in ("ztunnel-config", "zc"):
        targets = admin.targets_from_args(args.address, args.file, args.lab, args.node)
        dumps = [(t.label, admin.config_dump(t)) for t in targets]
        ns = None if args.all_namespaces else args.namespace
        _out(ztunnelconfig.render(args.section, dumps, args.output, namespace=ns))
        return 0
    if group == "version":
        return _version(args)
    if group in ("x", "experimental"):
        return _precheck(args)
    if group in ("proxy-status", "ps"):
        return _proxy_status(args)
    if group == "waypoint":
        return waypoint_cmd.run(args)
    if group == "completion":
        _out(completion.bash(parser) if args.shell == "bash" else completion.zsh(parser))
        return 0
    raise CtlError(f"unknown command {group!r}")


def _proxy_status(args: argparse.Namespace) -> int:
    base, netns = f"http://{args.controlplane}", ""
    if args.lab:  # the lab's control plane: debug endpoint inside the underlay netns
        base, netns = admin.lab_controlplane(args.lab)
    records = admin.get_json(
        f"{base}/debug/config", what="the control plane", hint=admin.CONTROLPLANE_HINT, netns=netns
    )
    connections = admin.get_json(
        f"{base}/debug/connections",
        what="the control plane",
        hint=admin.CONTROLPLANE_HINT,
        netns=netns,
    )
    dumps = []
    if args.address or args.file or args.lab:
        for t in admin.targets_from_args(args.address, args.file, args.lab, args.node):
            dumps.append((t.label, admin.config_dump(t)))
    rows = proxystatus.status_rows(records, connections, dumps)
    if args.output in ("table", "short"):
        _out(output.table(rows, proxystatus.COLUMNS))
    else:
        _out(output.document(rows, args.output))
    return 0 if all(r["status"] in ("SYNCED", "CONNECTED") for r in rows) else 1


def _version(args: argparse.Namespace) -> int:
    client = version()  # meshcore.telemetry: the one owner of this project's version
    doc: dict[str, Any] = {"clientVersion": {"version": client}}
    if args.remote:
        base, netns = f"http://{args.controlplane}", ""
        if args.lab:
            base, netns = admin.lab_controlplane(args.lab)
        try:
            remote = admin.get_json(
                f"{base}/version",
                what="the control plane",
                hint=admin.CONTROLPLANE_HINT,
                netns=netns,
            )
            doc["controlPlaneVersion"] = {"version": str(remote.get("version", "unknown"))}
        except CtlError as err:
            doc["controlPlaneVersion"] = {"error": str(err).splitlines()[0]}
    if args.output != "short":
        _out(output.document(doc, args.output))
        return 0
    _out(f"client version: {client}")
    if "controlPlaneVersion" in doc:
        cp = doc["controlPlaneVersion"]
        _out(f"control plane version: {cp.get('version') or 'unreachable (' + cp['error'] + ')'}")
    return 0


def _kubeconfig(args: argparse.Namespace) -> Path | None:
    """The kubeconfig istioctl would use: ``--kubeconfig``, else the first of $KUBECONFIG,
    else ~/.kube/config when it exists; None: no cluster configured."""
    if args.kubeconfig is not None:
        return Path(args.kubeconfig)
    env = os.environ.get("KUBECONFIG", "")
    first = next((p for p in env.split(os.pathsep) if p), "")
    if first:
        return Path(first)
    default = Path.home() / ".kube" / "config"
    return default if default.is_file() else None


def _precheck(args: argparse.Namespace) -> int:
    import asyncio

    from meshcore.kubeapi import KubeApi

    def read(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    release = read(args.proc / "sys/kernel/osrelease").strip() or os.uname().release
    findings = precheck.run_checks(
        release=release, mounts=read(args.proc / "mounts"), cni_dir=args.cni_conf_dir
    )
    kubeconfig = _kubeconfig(args)
    if kubeconfig is None:
        if args.context:
            raise CtlError(f"--context {args.context}: no kubeconfig (give --kubeconfig)")
        findings.append(
            precheck.Finding(
                False,
                "Kubernetes",
                "no cluster configured (--kubeconfig, $KUBECONFIG, ~/.kube/config): "
                "the API checks were not run",
                level="Warning",
            )
        )
    else:
        api = KubeApi(kubeconfig=kubeconfig, context=args.context)

        async def kube() -> list[precheck.Finding]:
            try:
                return await precheck.kubernetes_checks(
                    api, namespace=args.namespace, release=args.release
                )
            finally:
                await api.close()

        findings += asyncio.run(kube())
    if args.output == "short":
        for f in findings:
            _out(f.render())
    else:
        _out(output.document([f.to_dict() for f in findings], args.output))
    if precheck.failed(findings):
        print("precheck: issues found (see \u2718 above)", file=sys.stderr)
        return 1
    print("\u2714 No issues found when checking this node and cluster.", file=sys.stderr)
    return 0
