"""The files of the volumes a kubelet writes (the lab kubelet, `ambientctl.lab.kubelet`):
``configMap``, ``secret`` and ``projected`` (a service-account token from the TokenRequest API
bound to the pod, configMaps, secrets, downwardAPI fields), read through the API as the node's
own credential (NodeRestriction: only for its pods). ``emptyDir`` and ``hostPath`` need no
files; any other volume type or projected source is refused (`LabCommandError`), never skipped.
`host_volumes` maps every volume onto the host: hostPath on the node, the others in the pod's
directory (a file path leaving its volume is refused).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ambientctl.errors import LabCommandError
from ambientctl.lab.podspec import field_values
from meshcore.kubeapi import KubeApi

Json = Mapping[str, Any]


async def materialise(api: KubeApi, pod: Json, *, node_ip: str) -> dict[str, dict[str, bytes]]:
    """The files of kubelet-written volumes: configMap, secret, projected (service-account
    token from the TokenRequest API bound to the pod, configMap, downwardAPI); emptyDir and
    hostPath need none; any other volume type is refused."""
    meta, spec = pod["metadata"], pod["spec"]
    ns = str(meta["namespace"])
    out: dict[str, dict[str, bytes]] = {}
    for v in spec.get("volumes", []):
        name = str(v["name"])
        if "hostPath" in v or "emptyDir" in v:
            continue
        if "configMap" in v:
            out[name] = await _object_files(api, ns, "configmaps", v["configMap"])
        elif "secret" in v:
            ref = {**v["secret"], "name": v["secret"].get("secretName", "")}
            out[name] = await _object_files(api, ns, "secrets", ref)
        elif "projected" in v:
            files: dict[str, bytes] = {}
            for src in v["projected"].get("sources", []):
                if "serviceAccountToken" in src:
                    t = src["serviceAccountToken"]
                    files[str(t["path"])] = await _token(api, pod, t)
                elif "configMap" in src:
                    files.update(await _object_files(api, ns, "configmaps", src["configMap"]))
                elif "secret" in src:
                    files.update(await _object_files(api, ns, "secrets", src["secret"]))
                elif "downwardAPI" in src:
                    fields = field_values(pod, node_ip=node_ip, pod_ip="")
                    for item in src["downwardAPI"].get("items", []):
                        fp = (item.get("fieldRef") or {}).get("fieldPath")
                        if fp not in fields:
                            raise LabCommandError(f"volume {name}: unsupported {item}")
                        files[str(item["path"])] = fields[fp].encode()
                else:
                    raise LabCommandError(f"volume {name}: unsupported source {sorted(src)}")
            out[name] = files
        else:
            raise LabCommandError(f"volume {name}: unsupported type {sorted(v)}")
    return out


async def _object_files(api: KubeApi, ns: str, plural: str, ref: Json) -> dict[str, bytes]:
    path = f"/api/v1/namespaces/{ns}/{plural}/{ref['name']}"
    status, obj = await api.call("GET", path)
    if status != 200 or not isinstance(obj, Mapping):
        if status == 404 and ref.get("optional"):
            return {}
        raise LabCommandError(f"GET {path}: HTTP {status}")
    data: dict[str, bytes] = {}
    if plural == "secrets":
        data = {k: base64.b64decode(str(v)) for k, v in (obj.get("data") or {}).items()}
    else:
        data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(str(v)) for k, v in (obj.get("binaryData") or {}).items()})
    items = ref.get("items")
    if not items:
        return data
    return {str(i["path"]): data[str(i["key"])] for i in items if str(i["key"]) in data}


async def _token(api: KubeApi, pod: Json, source: Json) -> bytes:
    """A projected token as the kubelet gets it: TokenRequest for the pod's service
    account, bound to the pod (NodeRestriction lets a node ask only for its pods)."""
    meta = pod["metadata"]
    sa = pod["spec"].get("serviceAccountName") or "default"
    spec: dict[str, Any] = {
        "expirationSeconds": int(source.get("expirationSeconds", 3600)),
        "boundObjectRef": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta["name"],
            "uid": meta["uid"],
        },
    }
    if source.get("audience"):
        spec["audiences"] = [source["audience"]]
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
    path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token"
    status, data = await api.call("POST", path, body)
    if status != 201 or not isinstance(data, Mapping):
        raise LabCommandError(f"token for {meta['namespace']}/{sa}: HTTP {status}: {data}")
    return str(data["status"]["token"]).encode()


def host_volumes(
    pod: Json,
    pod_dir: Path,
    files: Mapping[str, Mapping[str, bytes]],
    host_path: Callable[[str], Path],
) -> dict[str, Path]:
    """volume name -> host path; hostPath on the node, the others in the pod's directory."""
    out: dict[str, Path] = {}
    for v in pod["spec"].get("volumes", []):
        name = str(v["name"])
        if "hostPath" in v:
            hp = host_path(str(v["hostPath"]["path"]))
            kind = v["hostPath"].get("type", "")
            if kind == "DirectoryOrCreate":
                hp.mkdir(parents=True, exist_ok=True)
            elif kind == "Directory" and not hp.is_dir():
                raise LabCommandError(f"volume {name}: hostPath {hp} is not a directory")
            out[name] = hp
            continue
        d = pod_dir / "volumes" / name
        d.mkdir(parents=True, exist_ok=True)
        out[name] = d
        for rel, data in files.get(name, {}).items():
            target = d / rel
            if d not in target.resolve().parents:
                raise LabCommandError(f"volume {name}: path {rel!r} leaves the volume")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return out
