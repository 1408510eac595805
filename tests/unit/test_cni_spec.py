"""Pure CNI logic: spec error codes, env parsing, result conversion, prevResult passthrough."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cni import spec
from cni.errors import (
    CniError,
    DecodingFailure,
    IncompatibleVersion,
    InvalidEnvironment,
    InvalidNetworkConfig,
)

BRIDGE_RESULT_1 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:00:00:01"},
        {"name": "veth1234abcd", "mac": "aa:bb:cc:00:00:02"},
        {"name": "eth0", "mac": "aa:bb:cc:00:00:03", "sandbox": "/run/netns/p1"},
    ],
    "ips": [{"interface": 2, "address": "10.240.1.5/24", "gateway": "10.240.1.1"}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}


def env(**extra: str) -> dict[str, str]:
    base = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/run/netns/p1",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client;K8S_POD_UID=u-1",
        "CNI_PATH": "/usr/lib/cni",
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v != "<unset>"}


def conf(**extra: Any) -> bytes:
    base: dict[str, Any] = {"cniVersion": "1.0.0", "name": "lab", "type": "ambient-cni"}
    base.update(extra)
    return json.dumps(base).encode()


def test_env_parsed_with_pod_ref() -> None:
    e = spec.parse_env(env())
    assert (e.command, e.container_id, e.netns, e.ifname) == ("ADD", "c1", "/run/netns/p1", "eth0")
    ref = spec.pod_ref(e)
    assert (ref.uid, ref.namespace, ref.name) == ("u-1", "demo", "client")


def test_pod_uid_falls_back_to_container_id() -> None:
    ref = spec.pod_ref(spec.parse_env(env(CNI_ARGS="IgnoreUnknown=1")))
    assert (ref.uid, ref.namespace, ref.name) == ("c1", "default", "")
    podman = spec.parse_env(env(CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAME=bb"))
    assert spec.pod_ref(podman, "pm") == spec.PodRef(uid="c1", namespace="pm", name="bb")


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"CNI_NETNS": "<unset>"}, ["CNI_NETNS"]),
        ({"CNI_CONTAINERID": "<unset>", "CNI_IFNAME": ""}, ["CNI_CONTAINERID", "CNI_IFNAME"]),
        ({"CNI_COMMAND": "<unset>"}, ["CNI_COMMAND"]),
        ({"CNI_COMMAND": "GC"}, ["CNI_COMMAND"]),
        ({"CNI_COMMAND": "CHECK", "CNI_NETNS": ""}, ["CNI_NETNS"]),
    ],
)
def test_bad_env_is_code_4_naming_the_variables(
    overrides: dict[str, str], names: list[str]
) -> None:
    with pytest.raises(InvalidEnvironment) as info:
        spec.parse_env(env(**overrides))
    assert info.value.code == 4
    for name in names:
        assert name in info.value.msg


def test_del_without_netns_is_fine() -> None:
    assert spec.parse_env(env(CNI_COMMAND="DEL", CNI_NETNS="<unset>")).netns == ""


def test_version_needs_nothing_else() -> None:
    assert spec.parse_env({"CNI_COMMAND": "VERSION"}).command == "VERSION"


def test_malformed_cni_args() -> None:
    with pytest.raises(InvalidEnvironment):
        spec.parse_env(env(CNI_ARGS="K8S_POD_NAME"))


@pytest.mark.parametrize(
    ("data", "cls", "code"),
    [
        (b"{not json", DecodingFailure, 6),
        (b"[1, 2]", DecodingFailure, 6),
        (b"\xff\xfe", DecodingFailure, 6),
        (conf(cniVersion="0.2.0"), IncompatibleVersion, 1),
        (conf(cniVersion="2.0.0"), IncompatibleVersion, 1),
        (conf(cniVersion=None), InvalidNetworkConfig, 7),
        (conf(name=""), InvalidNetworkConfig, 7),
        (conf(agentSocket="relative.sock"), InvalidNetworkConfig, 7),
        (conf(agentTimeout=0), InvalidNetworkConfig, 7),
        (conf(prevResult=[]), InvalidNetworkConfig, 7),
        (conf(prevResult={"ips": [{"address": "nope"}]}), InvalidNetworkConfig, 7),
    ],
)
def test_bad_config_codes(data: bytes, cls: type[CniError], code: int) -> None:
    with pytest.raises(cls) as info:
        spec.parse_netconf(data)
    assert info.value.code == code


@pytest.mark.parametrize("version", spec.SUPPORTED_VERSIONS)
def test_supported_versions_parse(version: str) -> None:
    nc = spec.parse_netconf(conf(cniVersion=version, agentSocket="/tmp/a.sock"))
    assert nc.cni_version == version
    assert nc.agent_socket == "/tmp/a.sock"


def test_result_1_0_to_0_4_adds_ip_version_and_keeps_the_rest() -> None:
    out = spec.convert_result(BRIDGE_RESULT_1, "0.4.0")
    assert out["cniVersion"] == "0.4.0"
    assert out["ips"] == [
        {"interface": 2, "address": "10.240.1.5/24", "gateway": "10.240.1.1", "version": "4"}
    ]
    assert {k: v for k, v in out.items() if k not in ("cniVersion", "ips")} == {
        k: v for k, v in BRIDGE_RESULT_1.items() if k not in ("cniVersion", "ips")
    }


def test_result_0_3_to_1_0_drops_ip_version() -> None:
    old = spec.convert_result(BRIDGE_RESULT_1, "0.3.1")
    new = spec.convert_result(old, "1.0.0")
    assert new == BRIDGE_RESULT_1


def test_ipv6_version() -> None:
    r = {"cniVersion": "1.0.0", "ips": [{"address": "fd00::5/64"}]}
    assert spec.convert_result(r, "0.3.0")["ips"][0]["version"] == "6"


def test_same_version_passthrough_is_identity() -> None:
    assert spec.convert_result(BRIDGE_RESULT_1, "1.0.0") == BRIDGE_RESULT_1


def test_pod_ips_and_host_veth() -> None:
    assert spec.pod_ips(BRIDGE_RESULT_1) == ("10.240.1.5",)
    assert spec.host_interfaces(BRIDGE_RESULT_1) == ("cni0", "veth1234abcd")
    assert spec.guess_host_veth(BRIDGE_RESULT_1) == "veth1234abcd"
    ptp = {"interfaces": [{"name": "vethX"}, {"name": "eth0", "sandbox": "/x"}]}
    assert spec.guess_host_veth(ptp) == "vethX"


def test_error_object_shape() -> None:
    err = IncompatibleVersion("incompatible CNI version 9.9.9", "supports ...")
    assert spec.error_object(err, "0.4.0") == {
        "cniVersion": "0.4.0",
        "code": 1,
        "msg": "incompatible CNI version 9.9.9",
        "details": "supports ...",
    }


def test_version_object() -> None:
    assert spec.version_object(b'{"cniVersion": "0.4.0"}') == {
        "cniVersion": "0.4.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"],
    }
    assert spec.version_object(b"")["cniVersion"] == "1.0.0"


def test_check_needs_0_4() -> None:
    with pytest.raises(IncompatibleVersion):
        spec.require_check_version("0.3.1")
    spec.require_check_version("0.4.0")
