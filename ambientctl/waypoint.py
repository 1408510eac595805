"""`ambientctl waypoint generate|apply|list|delete|status`: waypoints as Gateways.

Owns: the waypoint `Gateway` object (``gatewayClassName: istio-waypoint``, label
``istio.io/waypoint-for``, listener ``mesh`` HBONE 15008, as istioctl writes it), and writing it
(and the ``istio.io/use-waypoint`` enrollment label of a namespace or, for our per service
account waypoints, of a ServiceAccount) into a manifest directory (``-d DIR``) or a running
lab (``--lab NAME``: its manifest directory, which the control plane watches; the lab then
starts or removes the waypoint pod and waits until the node proxies route through it).

Invariants:
- Files are replaced atomically (temp file + rename): the control plane sees the old or the new
  object, never a partial one. Each Gateway lives in its own file
  ``waypoint-<namespace>-<name>.yaml``; objects elsewhere are rewritten in place.
- Order in a lab: the waypoint pod is ready before any namespace/service account is bound to
  it (traffic never points at a waypoint without endpoints); on delete the binding is removed
  first, then the Gateway and the pod.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ambientctl import output
from ambientctl.errors import CtlError

WAYPOINT_CLASS = "istio-waypoint"
WAYPOINT_FOR = "istio.io/waypoint-for"
USE_WAYPOINT = "istio.io/use-waypoint"
FOR_CHOICES = ("service", "workload", "all", "none")


def gateway_doc(name: str, namespace: str, waypoint_for: str = "service") -> dict[str, Any]:
    """The waypoint Gateway, as `istioctl waypoint generate` writes it."""
    if waypoint_for not in FOR_CHOICES:
        raise CtlError(f"--for {waypoint_for!r}: expected one of {', '.join(FOR_CHOICES)}")
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": namespace, "labels": {WAYPOINT_FOR: waypoint_for}},
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def gateway_file(directory: Path, name: str, namespace: str) -> Path:
    return directory / f"waypoint-{namespace}-{name}.yaml"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise CtlError(f"{directory}: not a directory")
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


def _docs(path: Path) -> list[Any]:
    """The documents of `path`; an unreadable file is skipped with a warning on stderr, so one
    broken file does not block work on the others (it is never rewritten)."""
    try:
        return list(yaml.safe_load_all(path.read_text()))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"ambientctl: warning: {path}: cannot read ({first}); skipped", file=sys.stderr)
        return []


def _ref(doc: Any) -> tuple[str, str, str] | None:
    if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict):
        return None
    meta = doc["metadata"]
    kind = str(doc.get("kind", ""))
    ns = "" if kind == "Namespace" else str(meta.get("namespace") or "default")
    return kind, ns, str(meta.get("name", ""))


def waypoints_in(directory: Path) -> list[dict[str, Any]]:
    """Waypoint Gateways of `directory`: {name, namespace, for, file}."""
    out = []
    for path in _files(directory):
        for doc in _docs(path):
            ref = _ref(doc)
            if ref is None or ref[0] != "Gateway":
                continue
            if (doc.get("spec") or {}).get("gatewayClassName") != WAYPOINT_CLASS:
                continue
            labels = doc["metadata"].get("labels") or {}
            out.append(
                {
                    "name": ref[2],
                    "namespace": ref[1],
                    "for": labels.get(WAYPOINT_FOR, "service"),
                    "file": path.name,
                }
            )
    return sorted(out, key=lambda w: (w["namespace"], w["name"]))


def bindings_in(directory: Path) -> dict[tuple[str, str], list[str]]:
    """(namespace, waypoint) -> objects bound with istio.io/use-waypoint."""
    out: dict[tuple[str, str], list[str]] = {}
    for path in _files(directory):
        for doc in _docs(path):
            ref = _ref(doc)
            if ref is None:
                continue
            labels = doc["metadata"].get("labels") or {}
            target = labels.get(USE_WAYPOINT)
            if target and target != "none":
                ns = ref[2] if ref[0] == "Namespace" else ref[1]
                wns = labels.get("istio.io/use-waypoint-namespace", ns)
                out.setdefault((wns, target), []).append(f"{ref[0]}/{ref[2]}")
    return out


def set_labels(
    directory: Path, kind: str, namespace: str, name: str, changes: Mapping[str, str | None]
) -> Path:
    """Set/remove labels of object (kind, namespace, name) in place; create it (Namespace or
    ServiceAccount) in ``<kind>-<ns>-<name>.yaml`` if no file declares it. Returns the file."""
    want = (kind, "" if kind == "Namespace" else namespace, name)
    for path in _files(directory):
        docs = _docs(path)
        for doc in docs:
            if _ref(doc) == want:
                labels = doc["metadata"].get("labels") or {}
                for k, v in changes.items():
                    if v is None:
                        labels.pop(k, None)
                    else:
                        labels[k] = v
                doc["metadata"]["labels"] = labels
                _atomic_write(path, yaml.safe_dump_all(docs, sort_keys=False))
                return path
    meta: dict[str, Any] = {"name": name}
    if kind != "Namespace":
        meta["namespace"] = namespace
    meta["labels"] = {k: v for k, v in changes.items() if v is not None}
    path = directory / f"{kind.lower()}-{namespace}-{name}.yaml"
    _atomic_write(
        path, yaml.safe_dump({"apiVersion": "v1", "kind": kind, "metadata": meta}, sort_keys=False)
    )
    return path


def remove_gateway(directory: Path, name: str, namespace: str) -> bool:
    """Delete the waypoint Gateway (its own file, or the document elsewhere)."""
    found = False
    for path in _files(directory):
        docs = _docs(path)
        keep = [d for d in docs if _ref(d) != ("Gateway", namespace, name)]
        if len(keep) == len(docs):
            continue
        found = True
        if not [d for d in keep if d is not None]:
            path.unlink()
        else:
            _atomic_write(path, yaml.safe_dump_all(keep, sort_keys=False))
    return found


# ------------------------------------------------------------------------------------- CLI


def register(sub: Any) -> None:
    wp = sub.add_parser(
        "waypoint",
        help="waypoints (L7 proxies): generate, apply, list, delete, status",
        description="Waypoints are Gateways with gatewayClassName istio-waypoint. Work on a "
        "manifest directory (-d DIR, e.g. the one the control plane watches) or a running lab "
        "(--lab NAME: the waypoint pod is started and traffic shifts live).",
    )
    cmds = wp.add_subparsers(dest="wp_command", required=True, metavar="SUBCOMMAND")

    def common(p: argparse.ArgumentParser, target: bool = True, listing: bool = False) -> None:
        p.add_argument("-n", "--namespace", default="default", help="the waypoint's namespace")
        if listing:
            p.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
            p.add_argument("--name", default=None, help="only the waypoint of this name")
            p.add_argument("-o", "--output", choices=output.FORMATS, default="table")
        else:
            p.add_argument("--name", default="waypoint", help="Gateway name (default: waypoint)")
        if target:
            g = p.add_mutually_exclusive_group()
            g.add_argument("-d", "--dir", type=Path, help="manifest directory to write into")
            g.add_argument("--lab", metavar="NAME", help="a running lab (its manifests)")

    gen = cmds.add_parser("generate", help="print the waypoint Gateway (YAML)")
    common(gen, target=False)
    gen.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    gen.add_argument(
        "--for",
        dest="waypoint_for",
        choices=FOR_CHOICES,
        default="service",
        help="traffic it serves (label istio.io/waypoint-for)",
    )
    gen.add_argument(
        "--service-account", help="a waypoint for one service account (implies --for workload)"
    )
    ap = cmds.add_parser("apply", help="write the Gateway (and bindings); in a lab start it")
    common(ap)
    ap.add_argument("--for", dest="waypoint_for", choices=FOR_CHOICES, default="service")
    ap.add_argument(
        "--enroll-namespace",
        action="store_true",
        help="label the namespace istio.io/use-waypoint=<name>",
    )
    ap.add_argument(
        "--service-account",
        help="bind this ServiceAccount (label "
        "istio.io/use-waypoint) to a waypoint for its workloads",
    )
    ls = cmds.add_parser("list", help="waypoints and what is bound to them")
    common(ls, listing=True)
    dl = cmds.add_parser("delete", help="remove a waypoint (and its bindings)")
    common(dl)
    st = cmds.add_parser("status", help="is the waypoint running and serving (lab)")
    common(st)
    st.add_argument("-o", "--output", choices=output.FORMATS, default="short")


def _for(args: argparse.Namespace) -> str:
    wf: str = args.waypoint_for
    if getattr(args, "service_account", None) and wf == "service":
        return "workload"
    return wf


def run(args: argparse.Namespace, out: Callable[[str], None] = print, lab: Any = None) -> int:
    """Run a parsed ``waypoint`` command; `lab` overrides ``--lab NAME`` (tests, the demo)."""
    say: Callable[[str], None] = lambda t: print(t, file=sys.stderr, flush=True)  # noqa: E731
    cmd = args.wp_command
    if cmd == "generate":
        out(output.document(gateway_doc(args.name, args.namespace, _for(args)), args.output))
        return 0
    if lab is not None:
        directory = lab.paths.manifests
    elif getattr(args, "lab", None):
        from ambientctl.lab.lab import Lab

        lab = Lab(args.lab, log=say)
        lab.load()
        directory = lab.paths.manifests
    elif getattr(args, "dir", None):
        directory = args.dir
    elif cmd == "apply":
        return _apply_kube(args, out)
    else:
        raise CtlError(f"waypoint {cmd}: give -d DIR (manifest directory) or --lab NAME")
    if not directory.is_dir():
        raise CtlError(f"waypoint {cmd}: {directory}: not a directory")
    if cmd == "apply":
        return _apply(args, directory, lab, out)
    if cmd == "list":
        return _list(args, directory, out)
    if cmd == "delete":
        return _delete(args, directory, lab, out)
    if cmd == "status":
        return _status(args, directory, lab, out)
    raise CtlError(f"unknown waypoint command {cmd!r}")


def _list(args: argparse.Namespace, directory: Path, out: Callable[[str], None]) -> int:
    binds = bindings_in(directory)
    rows = [
        {**w, "bound": binds.get((w["namespace"], w["name"]), [])}
        for w in waypoints_in(directory)
        if (args.all_namespaces or w["namespace"] == args.namespace)
        and (args.name is None or w["name"] == args.name)
    ]
    if args.output in ("json", "yaml"):
        out(output.document(rows, args.output))
    else:
        cols = [
            ("NAMESPACE", "namespace"),
            ("NAME", "name"),
            ("FOR", "for"),
            ("BOUND", "bound"),
        ]
        out(output.table(rows, cols))
    return 0


def _delete(args: argparse.Namespace, directory: Path, lab: Any, out: Callable[[str], None]) -> int:
    for ref in bindings_in(directory).get((args.namespace, args.name), []):
        kind, _, name = ref.partition("/")
        set_labels(directory, kind, args.namespace, name, {USE_WAYPOINT: None})
        out(f"{ref}: {USE_WAYPOINT} removed")
    if lab is not None:
        _wait_bound(lab, args.namespace, args.name, False, out)
    if not remove_gateway(directory, args.name, args.namespace):
        raise CtlError(f"no waypoint {args.namespace}/{args.name} in {directory}")
    out(f"waypoint {args.namespace}/{args.name} deleted")
    if lab is not None:
        _started, removed = lab.sync_waypoints()
        for key in removed:
            out(f"waypoint pod {key} removed")
    return 0


def _apply(args: argparse.Namespace, directory: Path, lab: Any, out: Callable[[str], None]) -> int:
    wf = _for(args)
    if args.enroll_namespace and wf not in ("service", "all"):
        raise CtlError(
            "--enroll-namespace binds the namespace's services: needs --for service "
            "or all (workload waypoints: --service-account or pod labels)"
        )
    path = gateway_file(directory, args.name, args.namespace)
    _atomic_write(path, yaml.safe_dump(gateway_doc(args.name, args.namespace, wf), sort_keys=False))
    out(f"waypoint {args.namespace}/{args.name} (for {wf}) written to {path}")
    if lab is not None:
        started, _removed = lab.sync_waypoints()
        for key in started:
            out(f"waypoint pod {key} is ready")
    if args.service_account:
        set_labels(
            directory,
            "ServiceAccount",
            args.namespace,
            args.service_account,
            {USE_WAYPOINT: args.name},
        )
        out(f"serviceaccount {args.namespace}/{args.service_account} bound to {args.name}")
    if args.enroll_namespace:
        if lab is not None:
            lab.label_namespace(args.namespace, {USE_WAYPOINT: args.name})
        else:
            set_labels(directory, "Namespace", "", args.namespace, {USE_WAYPOINT: args.name})
        out(f"namespace {args.namespace} labeled with {USE_WAYPOINT}={args.name}")
    if lab is not None and args.enroll_namespace:
        _wait_bound(lab, args.namespace, args.name, True, out)
        out("node proxies send the namespace's services through the waypoint")
    return 0


APPLY = "application/apply-patch+yaml"


def _apply_kube(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    """``waypoint apply`` against the Kubernetes API (no -d/--lab): server-side apply of the
    Gateway and of the bindings' labels (field manager ``ambientctl``), as ``kubectl apply``
    of `gateway_doc` and ``kubectl label`` would; then wait (bounded) for the waypoint
    controller's ``Programmed`` condition. Kubeconfig: ``--kubeconfig``, else $KUBECONFIG,
    else the in-cluster service account."""
    import asyncio

    from meshcore.kubeapi import KubeApi, TypedBody

    wf = _for(args)
    if args.enroll_namespace and wf not in ("service", "all"):
        raise CtlError(
            "--enroll-namespace binds the namespace's services: needs --for service "
            "or all (workload waypoints: --service-account or pod labels)"
        )
    env = os.environ.get("KUBECONFIG")
    kubeconfig = getattr(args, "kubeconfig", None) or (Path(env) if env else None)
    if kubeconfig is None and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise CtlError(
            "waypoint apply: give -d DIR (manifest directory) or --lab NAME, or a Kubernetes "
            "cluster (--kubeconfig, $KUBECONFIG, or run in-cluster)"
        )
    ns, name = args.namespace, args.name
    query = [("fieldManager", "ambientctl"), ("force", "true")]

    async def apply(api: KubeApi, path: str, doc: dict[str, Any], what: str) -> None:
        status, data = await api.call(
            "PATCH", path, TypedBody(content=doc, content_type=APPLY), query=query
        )
        if status not in (200, 201):
            msg = (data or {}).get("message", "") if isinstance(data, dict) else ""
            raise CtlError(f"{what}: HTTP {status} {msg}".rstrip())

    def labelled(kind: str, obj_name: str, namespace: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": obj_name, "labels": {USE_WAYPOINT: name}}
        if namespace:
            meta["namespace"] = namespace
        return {"apiVersion": "v1", "kind": kind, "metadata": meta}

    async def main() -> bool:
        api = KubeApi(kubeconfig=kubeconfig)
        try:
            gw_path = f"/apis/gateway.networking.k8s.io/v1/namespaces/{ns}/gateways/{name}"
            await apply(api, gw_path, gateway_doc(name, ns, wf), f"Gateway {ns}/{name}")
            out(f"waypoint {ns}/{name} (for {wf}) applied")
            if args.service_account:
                sa = args.service_account
                path = f"/api/v1/namespaces/{ns}/serviceaccounts/{sa}"
                await apply(api, path, labelled("ServiceAccount", sa, ns), f"serviceaccount {sa}")
                out(f"serviceaccount {ns}/{sa} bound to {name}")
            if args.enroll_namespace:
                path = f"/api/v1/namespaces/{ns}"
                await apply(api, path, labelled("Namespace", ns, None), f"namespace {ns}")
                out(f"namespace {ns} labeled with {USE_WAYPOINT}={name}")
            for _ in range(120):  # the waypoint controller reports Programmed (0.5 s x 120)
                status, gw = await api.call("GET", gw_path)
                conds = ((gw or {}).get("status") or {}).get("conditions") or []
                if status == 200 and any(
                    c.get("type") == "Programmed" and c.get("status") == "True" for c in conds
                ):
                    return True
                await asyncio.sleep(0.5)
            return False
        finally:
            await api.close()

    try:
        programmed = asyncio.run(main())
    except OSError as e:
        raise CtlError(f"waypoint apply: the Kubernetes API: {e}") from e
    out(
        f"waypoint {ns}/{name} "
        + (
            "programmed"
            if programmed
            else "NOT programmed after 60s (is the control plane's waypoint controller running?)"
        )
    )
    return 0 if programmed else 1


def _wait_bound(
    lab: Any, namespace: str, name: str, bound: bool, out: Callable[[str], None]
) -> None:
    """Until every node proxy has the namespace's services bound to waypoint `name` (or, with
    `bound` False, not bound to it). Services that opt out keep their own binding: a timeout is
    reported, not raised."""
    host = f"{name}.{namespace}.svc."
    skip = {w["name"] for w in waypoints_in(lab.paths.manifests)} | {name}

    def ok(dump: dict[str, Any]) -> bool:
        for svc in dump.get("services", []):
            if svc.get("namespace") != namespace or svc.get("name") in skip:
                continue
            if (host in json.dumps(svc.get("waypoint"))) != bound:
                return False
        return True

    what = f"node proxies to {'bind' if bound else 'unbind'} {namespace}'s services"
    try:
        lab.wait_proxies(ok, what=what, timeout=20)
    except CtlError as err:
        out(f"warning: {err}")


def _status(args: argparse.Namespace, directory: Path, lab: Any, out: Callable[[str], None]) -> int:
    doc = status_doc(args.namespace, args.name, directory, lab)
    if args.output in ("json", "yaml"):
        out(output.document(doc, args.output))
        return 0 if doc.get("ready", True) else 1
    out(f"waypoint {doc['namespace']}/{doc['name']}: for {doc['for']}, file {doc['file']}")
    if lab is None:
        out("(not running: -d only writes manifests; the control plane/cluster runs it)")
        return 0
    pod = doc["pod"]
    if not pod.get("node"):
        out(f"pod {pod['name']}: not created")
        return 1
    where = f"pod {pod['name']} on {pod['node']} ({pod['ip']})"
    if not doc["ready"]:
        out(f"{where}: NOT READY ({doc['error']})")
        return 1
    out(f"{where}: ready as {doc['identity']}")
    out(f"  serves: {', '.join(doc['serves']) or '-'}")
    for t in doc["routes"]:
        out(f"  routes: {t['kind']} {t['name']} hosts={','.join(t['hosts'])}")
    for p in doc["policies"]:
        out(f"  policy: {p['name']} {p['action']}{' ERROR ' + p['error'] if p['error'] else ''}")
    for w in doc["warnings"]:
        out(f"  warning: {w}")
    return 0


def status_doc(namespace: str, name: str, directory: Path, lab: Any) -> dict[str, Any]:
    """What `waypoint status` reports: the Gateway, and in a lab its pod and what it serves
    (``ready`` absent without a lab: a manifest directory runs nothing)."""
    gws = [w for w in waypoints_in(directory) if w["namespace"] == namespace and w["name"] == name]
    if not gws:
        raise CtlError(f"no waypoint {namespace}/{name} in {directory}")
    doc: dict[str, Any] = {
        "namespace": namespace,
        "name": name,
        "for": gws[0]["for"],
        "file": gws[0]["file"],
    }
    if lab is None:
        return doc
    key = f"{namespace}/{name}-waypoint"
    doc["pod"], doc["ready"] = {"name": key}, False
    try:
        ps = lab.pod(key)
    except CtlError:
        doc["error"] = "pod not created"
        return doc
    doc["pod"] = {"name": key, "node": ps.node, "ip": ps.ip}
    try:
        cfg = json.loads(lab.waypoint_admin(key, "/debug/config"))
    except CtlError as err:
        doc["error"] = str(err)
        return doc
    doc.update(
        ready=True,
        identity=cfg["waypoint"]["identity"],
        serves=list(cfg["served_services"]),
        routes=[{k: t[k] for k in ("kind", "name", "hosts")} for t in cfg["route_tables"]],
        policies=[{k: p[k] for k in ("name", "action", "error")} for p in cfg["policies"]],
        warnings=list(cfg["warnings"]),
    )
    return doc
