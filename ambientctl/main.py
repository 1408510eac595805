"""`ambientctl`: the operator CLI (one entry point, istioctl habits).

    ambientctl install [-f values.yaml] [--set k=v]   (helm upgrade --install; needs a cluster)
    ambientctl manifest generate [-f ...] [--set ...] (render the chart offline)
    ambientctl analyze [-d DIR | FILE ...] [--lab N]  (configuration problems, codes AMB0xxx)
    ambientctl ztunnel-config workloads|services|policies|certificates|connections|all
                              [-o short|json|yaml] [-n NS | -A]  (singular names are aliases)
    ambientctl proxy-status                           (node proxies vs the control plane)
    ambientctl version                                (client and control plane)
    ambientctl x precheck   (kernel, eBPF, CNI chain; Kubernetes version, RBAC, installs, CRDs)
    ambientctl completion bash|zsh
    ambientctl lab up DIR [--name N] [--node NAME ...] [--capture ebpf|off]
    ambientctl lab up --kube [--node NAME ...]    (nodes of a real cluster, docs/kube.md)
    ambientctl lab kubectl|helm|ctl -- ARGS...    (against a --kube lab's API server; ctl:
                                                   ambientctl, e.g. `waypoint apply`)
    ambientctl lab down | pods | exec POD -- CMD... | label namespace NS key=value|key- ...
    ambientctl lab node-exec NODE -- CMD...     (a command in a node's netns, e.g. curl metrics)
    ambientctl lab demo [--keep] [--waypoint] [--http3]   (the README demo, examples/lab[-waypoint])
    ambientctl lab demo --kube [--keep]         (helm install -> label -> waypoint per service
                                                 account, on a real cluster of lab nodes)
    ambientctl waypoint generate|apply|list|delete|status [-d DIR | --lab N] (waypoints)

Global flags accepted anywhere before ``--`` (istioctl's persistent flags): ``--context NAME``,
``--kubeconfig PATH``; they act on the commands that talk to a cluster (`USES_CLUSTER`), and
given to any other command they are named in a warning on stderr, never silently dropped.

The non-lab commands live in `ambientctl.commands`. Errors are `ambientctl.errors.CtlError`
(message on stderr, `exit_code` as status), translated here and nowhere else; an OS error a
command did not anticipate (a file it cannot read or write) is one line too, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ambientctl import commands, output
from ambientctl.errors import CtlError
from ambientctl.lab import topology
from ambientctl.lab.lab import Lab


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _label_changes(items: Sequence[str]) -> dict[str, str | None]:
    changes: dict[str, str | None] = {}
    for item in items:
        if item.endswith("-") and "=" not in item:
            changes[item[:-1]] = None
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CtlError(f"label {item!r}: expected key=value or key-")
        changes[key] = value
    return changes


GLOBAL_FLAGS = ("--context", "--kubeconfig")
USES_CLUSTER = ("install", "x", "experimental")
"""The commands that talk to a Kubernetes cluster (the others read files, a lab or an admin
address): where ``--context``/``--kubeconfig`` do something."""


def split_global_flags(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(argv without the global flags, {"context"|"kubeconfig": value}); nothing after ``--``
    is touched (it belongs to a command run in a pod)."""
    rest: list[str] = []
    found: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        name, eq, value = arg.partition("=")
        if name in GLOBAL_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise CtlError(f"{name} needs a value")
                i += 1
                value = argv[i]
            found[name[2:]] = value
        else:
            rest.append(arg)
        i += 1
    return rest, found


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ambientctl",
        description="ambient-mesh operator CLI",
        epilog="global flags (anywhere): --context NAME, --kubeconfig PATH",
    )
    sub = p.add_subparsers(dest="group", required=True, metavar="COMMAND")
    commands.register(sub)
    lab = sub.add_parser("lab", help="a whole mesh on one machine (network namespaces)")
    lab.add_argument("--name", default=os.environ.get("AMBIENT_LAB", "lab"), help="lab name")
    lab.add_argument("--state-root", type=Path, default=topology.STATE_ROOT)
    cmds = lab.add_subparsers(dest="command", required=True)
    up = cmds.add_parser("up", help="build the lab from a directory of manifests")
    up.add_argument("dir", type=Path, nargs="?", help="manifests (not with --kube)")
    up.add_argument(
        "--kube",
        action="store_true",
        help="the nodes as nodes of a real Kubernetes cluster (docs/kube.md): "
        "install the mesh with `lab helm -- install ...`",
    )
    up.add_argument("--node", action="append", default=[], help="node names (order = index)")
    up.add_argument(
        "--capture",
        choices=("ebpf", "off"),
        default="ebpf",
        help="off: plain network, no agents/node proxies",
    )
    up.add_argument(
        "--cni",
        choices=topology.PRIMARY_PLUGINS,
        default=topology.DEFAULT_PRIMARY_PLUGIN,
        help="primary CNI plugin (before ambient-cni)",
    )
    cmds.add_parser("down", help="tear the lab down, leaving nothing behind")
    pods = cmds.add_parser("pods", help="list pods with their redirection state")
    pods.add_argument("-n", "--namespace", default=None, help="only this namespace")
    pods.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    pods.add_argument("-o", "--output", choices=output.FORMATS, default="table")
    ex = cmds.add_parser("exec", help="run a command in a pod's network namespace")
    ex.add_argument("pod")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    nx = cmds.add_parser("node-exec", help="run a command in a node's network namespace")
    nx.add_argument("node")
    nx.add_argument("cmd", nargs=argparse.REMAINDER)
    lb = cmds.add_parser("label", help="label a namespace live (kubectl label style)")
    lb.add_argument("kind", choices=("namespace", "ns"))
    lb.add_argument("target")
    lb.add_argument("labels", nargs="+")
    for tool in ("kubectl", "helm", "ctl"):
        tp = cmds.add_parser(tool, help=f"{tool} against a --kube lab's API server")
        tp.add_argument("cmd", nargs=argparse.REMAINDER)
        tp.add_argument("--name", default=argparse.SUPPRESS, help="lab name")
    demo = cmds.add_parser("demo", help="the README demo: two nodes, mTLS between pods")
    demo.add_argument("--keep", action="store_true", help="leave the lab running")
    for sp in (up, demo):
        sp.add_argument(
            "--http3",
            action="store_true",
            help="HBONE over HTTP/3 (QUIC, 15008/udp on the node address) between "
            "the node proxies (issue 16)",
        )
    demo.add_argument(
        "--kube",
        action="store_true",
        help="on a real Kubernetes cluster of lab nodes: helm install, label, a waypoint per "
        "service account, helm uninstall (docs/kube.md)",
    )
    demo.add_argument(
        "--waypoint",
        action="store_true",
        help="the waypoint demo (examples/lab-waypoint): the seed's VirtualService "
        "shifting traffic, L7 deny, waypoint metrics",
    )
    for sp in (up, ex, nx, lb, demo, pods, cmds.choices["down"]):
        # `lab exec --name X ...` as well as `lab --name X exec ...`
        sp.add_argument("--name", default=argparse.SUPPRESS, help="lab name")
    return p


def _strip_dashes(cmd: list[str]) -> list[str]:
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CtlError("missing command after --")
    return cmd


def _run_kube_lab(args: argparse.Namespace) -> bool:
    """The commands of a ``lab up --kube`` lab (ambientctl.lab.kubelab); False: not one."""
    from ambientctl.lab import kubelab

    kube_up = args.command == "up" and args.kube
    if args.command == "demo" and args.kube:
        from ambientctl.lab.demo_kube import run_kube_demo

        demo = kubelab.KubeLab(args.name, state_root=args.state_root, log=_say)
        if run_kube_demo(demo, keep=args.keep) != 0:
            raise CtlError("the kube demo failed (see above)")
        return True
    if args.command == "up" and not kube_up and args.dir is None:
        raise CtlError("lab up: a manifest directory, or --kube")
    if not kube_up and args.command not in ("kubectl", "helm", "ctl", "down", "exec"):
        return False
    if args.command in ("down", "exec") and not kubelab.is_kube_lab(args.name, args.state_root):
        return False
    klab = kubelab.KubeLab(args.name, state_root=args.state_root, log=_say)
    if kube_up:
        if args.dir is not None:
            raise CtlError("lab up --kube takes no manifest directory (use `lab kubectl apply`)")
        klab.up(args.node)
    elif args.command == "down":
        klab.down()
    elif args.command == "exec":
        ns, _, pod = args.pod.rpartition("/")
        argv = klab.exec_argv(ns or "default", pod, _strip_dashes(args.cmd))
        os.execvp(argv[0], argv)
    else:
        argv = klab.tool_argv(args.command, _strip_dashes(args.cmd))
        os.execvp(argv[0], argv)
    return True


def run(argv: Sequence[str] | None = None) -> int:
    p = parser()
    rest, flags = split_global_flags(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(rest)
    args.context = flags.get("context")
    args.kubeconfig = Path(flags["kubeconfig"]) if "kubeconfig" in flags else None
    if args.kubeconfig is not None and not args.kubeconfig.is_file():
        raise CtlError(f"--kubeconfig {args.kubeconfig}: no such file")
    if flags and args.group not in USES_CLUSTER:  # said, not silently ignored
        given = " and ".join(f"--{k}" for k in flags)
        _say(f"ambientctl: warning: {given} not used: `{args.group}` reads no cluster")
    if args.group != "lab":
        return commands.run(args, p)
    if _run_kube_lab(args):
        return 0
    return _run_lab(args)


def _run_lab(args: argparse.Namespace) -> int:
    """`ambientctl lab ...` on a manifest-directory lab."""
    lab = Lab(args.name, state_root=args.state_root, log=_say)
    if args.command == "up":
        lab.up(args.dir, capture=args.capture, nodes=args.node, primary=args.cni, http3=args.http3)
        for row in lab.pods():
            _say(f"  {row['namespace']}/{row['name']} {row['node']} {row['ip']}")
    elif args.command == "down":
        lab.down()
    elif args.command == "pods":
        rows = [
            r
            for r in lab.pods()
            if args.all_namespaces or not args.namespace or r["namespace"] == args.namespace
        ]
        if args.output in ("json", "yaml"):
            print(output.document(rows, args.output))
            return 0
        columns = [(k.upper(), k) for k in ("namespace", "name", "node", "ip", "status")]
        print(output.table(rows, [*columns, ("REDIRECTION", "redirection")]))
        print("(REDIRECTION = annotation ambient.istio.io/redirection)", file=sys.stderr)
    elif args.command == "exec":
        argv2 = lab.exec_argv(args.pod, _strip_dashes(args.cmd))
        os.chdir(lab.paths.manifests)
        os.execvp(argv2[0], argv2)
    elif args.command == "node-exec":
        argv2 = lab.node_argv(args.node, _strip_dashes(args.cmd))
        os.execvp(argv2[0], argv2)
    elif args.command == "label":
        for change in lab.label_namespace(args.target, _label_changes(args.labels)):
            print(change)
    elif args.command == "demo":
        if args.waypoint:
            from ambientctl.lab.demo_waypoint import run_waypoint_demo

            return run_waypoint_demo(lab, keep=args.keep)
        from ambientctl.lab.demo import run_demo

        return run_demo(lab, keep=args.keep, http3=args.http3)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except CtlError as err:
        print(f"ambientctl: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as err:
        print(f"ambientctl: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
