"""A lab container's filesystem view: bind mounts in a private mount namespace, then exec.

The lab kubelet (ambientctl.lab.kubelet) starts every container process as
``nsenter --net=<pod netns> unshare --mount --propagation slave python -m
ambientctl.lab.container --bind SRC=DST ... -- ARGV``: this module mounts each ``SRC`` (a volume
the kubelet materialised, a hostPath of the node) on ``DST`` (the container's ``mountPath``),
in order, then replaces itself with ``ARGV``. So a process finds its volumes where the rendered
manifest says (``/var/run/secrets/kubernetes.io/serviceaccount/token`` for the in-cluster
client, ``/etc/ambient/controlplane-roots`` for the node proxy) and nothing is rewritten.

A mount hides what was at its mount point: `hidden` tells when a container could not see the
programs the lab runs it with (`lab_paths`: the repository `REPO`, its virtualenv), e.g. a tree
under ``/tmp``, where the chart's pods mount an emptyDir (the container's exec then fails with
ENOENT).

Invariants: the namespace is a slave of the caller's (``unshare --propagation slave``): mounts
made here never propagate out, while netns bind mounts the host makes later (``ip netns add``)
still propagate in. A mount point that does not exist is created (directory, or an empty file
for a file source) and its path appended to ``--created`` so the lab can remove it at
``down``; nothing else is written outside the sources.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
"""The repository the lab runs from (its sources, examples and chart)."""


def lab_paths(python: str = sys.executable) -> dict[str, Path]:
    """What every lab container runs from, for `hidden`: the lab has no images, its pods run
    the repository's entry points from its virtualenv with the interpreter `python`."""
    return {"repository": REPO, "virtualenv": Path(sys.prefix), "interpreter": Path(python)}


@dataclass(frozen=True, slots=True, kw_only=True)
class Bind:
    source: Path
    target: Path
    read_only: bool = False

    def arg(self) -> str:
        return f"{self.source}={self.target}" + (":ro" if self.read_only else "")


def parse_bind(text: str) -> Bind:
    source, sep, target = text.partition("=")
    read_only = target.endswith(":ro")
    target = target.removesuffix(":ro")
    if not sep or not source.startswith("/") or not target.startswith("/"):
        raise argparse.ArgumentTypeError(f"--bind {text!r}: expected /SRC=/DST[:ro]")
    return Bind(source=Path(source), target=Path(target), read_only=read_only)


def ordered(binds: Sequence[Bind]) -> list[Bind]:
    """Parents before children (``/var/run/ambient`` before ``/var/run/ambient/ztunnel``), so a
    nested mount lands inside the one it belongs to; same-path binds are dropped."""
    return sorted((b for b in binds if b.source != b.target), key=lambda b: len(b.target.parts))


def hidden(needed: Mapping[str, Path], mount_points: Iterable[Path]) -> str | None:
    """Why a container whose mounts are at `mount_points` would not see one of `needed` (what
    -> path, e.g. ``{"virtualenv": sys.prefix}``): "the <what> <path> is under <mount
    point>" for the first at or under a mount point, as given or with its symbolic links
    resolved; None when every one stays visible."""
    points = [Path(os.path.abspath(m)) for m in mount_points]
    for what, path in needed.items():
        for form in dict.fromkeys((Path(os.path.abspath(path)), path.resolve())):
            for point in points:
                if form == point or point in form.parents:
                    return f"the {what} {path} is under {point}"
    return None


def launcher_argv(
    python: str, binds: Sequence[Bind], argv: Sequence[str], *, created: Path
) -> list[str]:
    """The command that runs ``argv`` with ``binds`` (to be prefixed with nsenter --net)."""
    words = ["unshare", "--mount", "--propagation", "slave", "--", python, "-m", __name__]
    for b in ordered(binds):
        words += ["--bind", b.arg()]
    return [*words, "--created", str(created), "--", *argv]


def _mountpoint(b: Bind, created: Path) -> None:
    if b.target.exists():
        return
    missing = [p for p in (b.target, *b.target.parents) if not p.exists()]
    # exist_ok: containers of other pods (other nodes' kubelets) may create it at the same time.
    if b.source.is_dir():
        b.target.mkdir(parents=True, exist_ok=True)
    else:
        b.target.parent.mkdir(parents=True, exist_ok=True)
        b.target.touch(exist_ok=True)
    with open(created, "a") as f:
        f.writelines(f"{p}\n" for p in missing)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ambientctl.lab.container")
    p.add_argument("--bind", type=parse_bind, action="append", default=[])
    p.add_argument("--created", type=Path, required=True)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("missing command after --")
    for b in ordered(args.bind):
        _mountpoint(b, args.created)
        subprocess.run(["mount", "--bind", str(b.source), str(b.target)], check=True)
        if b.read_only:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(b.target)], check=True)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main())
