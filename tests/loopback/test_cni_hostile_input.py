"""`ambient-cni` on hostile input: the real plugin executable, and a hypothesis fuzz target over
its whole request handling (issue 10, items 5 and Build 5).

Contract checked on every input: exit status 0 or 1; stdout is nothing (successful DEL/CHECK)
or exactly one JSON document; exit 1 iff that document is the spec's error object
({cniVersion, code, msg[, details]}); never a traceback, and never our catch-all "internal
error" (code 999), which would mean a bug was hit. The fuzzed agent is a real unix socket
answering with fuzzed bytes (garbage, deep nesting, failures, success).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni import plugin, spec

BIN = Path(sys.executable).parent / "ambient-cni"
ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c1",
    "CNI_NETNS": "/run/netns/p1",
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client;K8S_POD_UID=u-1",
}


def check_contract(rc: int, out: str, command: str) -> dict[str, Any] | None:
    assert rc in (0, 1), rc
    if out == "":
        assert rc == 0, (rc, command)
        assert command in ("DEL", "CHECK"), (rc, command)
        return None
    assert out.endswith("\n"), out[:300]
    assert out.count("\n") == 1, out[:300]
    obj = json.loads(out)
    assert isinstance(obj, dict)
    is_error = "code" in obj and "msg" in obj
    assert is_error == (rc == 1), obj
    if is_error:
        assert set(obj) <= {"cniVersion", "code", "msg", "details"}, obj
        assert obj["cniVersion"] in spec.SUPPORTED_VERSIONS
        assert isinstance(obj["code"], int)
        assert isinstance(obj["msg"], str)
        assert obj["code"] != 999, obj  # the catch-all: a bug was reached
    return obj


def exec_plugin(stdin: bytes, command: str = "ADD") -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run(
        [str(BIN)],
        input=stdin,
        env={**ENV, "CNI_COMMAND": command},
        capture_output=True,
        timeout=60,
    )
    stderr = proc.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    obj = check_contract(proc.returncode, proc.stdout.decode(), command)
    assert obj is not None
    return proc.returncode, obj, stderr


def test_deep_nesting_is_a_decoding_error_not_a_recursion_error() -> None:
    for data in (b"[" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        rc, obj, _ = exec_plugin(data)
        assert rc == 1
        assert obj["code"] == 6
        assert "nested too deeply" in obj["msg"]


def test_nesting_limit_applies_inside_a_valid_configuration() -> None:
    deep = "[" * (spec.MAX_DEPTH + 1) + "]" * (spec.MAX_DEPTH + 1)
    data = f'{{"cniVersion":"0.4.0","name":"n","type":"ambient-cni","x":{deep}}}'.encode()
    rc, obj, _ = exec_plugin(data)
    assert (rc, obj["code"], obj["cniVersion"]) == (1, 6, spec.LATEST_VERSION)


def test_version_command_survives_deep_nesting() -> None:
    rc, obj, _ = exec_plugin(b"[" * 100_000, "VERSION")
    assert rc == 0
    assert obj["supportedVersions"] == list(spec.SUPPORTED_VERSIONS)


def test_stdin_is_bounded() -> None:
    """64 MiB offered: the plugin answers "too large" after reading at most 1 MiB + 1 byte, so
    the writer meets a closed pipe instead of delivering everything."""
    proc = subprocess.Popen(
        [str(BIN)],
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    blob = b'{"cniVersion":"1.0.0","name":"n","type":"ambient-cni","pad":"' + b"x" * (64 << 20)
    written = 0
    try:
        view = memoryview(blob)
        while written < len(view):
            written += proc.stdin.write(view[written : written + (1 << 20)]) or 0
        proc.stdin.close()
    except BrokenPipeError:
        pass
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.wait(30) == 1
    assert written < len(blob)
    obj = check_contract(1, out.decode(), "ADD")
    assert obj is not None
    assert obj["code"] == 6
    assert "too large" in obj["msg"]
    assert b"Traceback" not in err


# ------------------------------------------------------------------------------ fuzz target


@contextlib.contextmanager
def fake_agent(path: Path, answer: bytes) -> Iterator[None]:
    """A real unix socket peer that reads one request line and answers `answer`."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    wake_r, wake_w = os.pipe()

    def serve() -> None:
        waitables: list[socket.socket | int] = [srv, wake_r]
        readable, _, _ = select.select(waitables, [], [], 30)
        if srv not in readable:
            return  # the plugin never connected (the test is over)
        with contextlib.suppress(OSError):
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(5)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        os.write(wake_w, b"x")
        thread.join(10)
        srv.close()
        os.close(wake_r)
        os.close(wake_w)
        path.unlink(missing_ok=True)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
ip_entries = st.lists(
    st.fixed_dictionaries(
        {
            "address": st.sampled_from(["10.0.0.5/24", "fd00::5/64", "nope", "10.0.0.5"])
            | json_values
        },
        optional={"interface": json_values, "version": json_values, "gateway": json_values},
    ),
    max_size=3,
)
prev_results = st.fixed_dictionaries(
    {},
    optional={
        "cniVersion": json_values,
        "ips": ip_entries | json_values,
        "interfaces": st.lists(
            st.fixed_dictionaries({}, optional={"name": json_values, "sandbox": json_values}),
            max_size=3,
        )
        | json_values,
        "routes": json_values,
    },
)
configs = st.fixed_dictionaries(
    {},
    optional={
        "cniVersion": st.sampled_from([*spec.SUPPORTED_VERSIONS, "0.1.0", "9.9.9", "x"])
        | json_values,
        "name": st.just("n") | json_values,
        "type": st.just("ambient-cni") | json_values,
        "agentTimeout": st.sampled_from([1, 0.5, 0, -1, True, "1"]) | json_values,
        "defaultNamespace": json_values,
        "prevResult": prev_results | json_values,
        "extra": json_values,
    },
)


def deep(depth: int, opener: str) -> bytes:
    closer = "]" if opener == "[" else "}"
    head = opener if opener == "[" else '{"a":'
    return (head * depth + "1" + closer * depth).encode()


stdin_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(deep, st.integers(0, 3000), st.sampled_from(["[", "{"])),
    json_values.map(lambda v: json.dumps(v).encode()),
)
agent_answers = st.one_of(
    st.just(b'{"ok":true,"result":"enrolled"}\n'),
    st.builds(
        lambda code, msg: json.dumps({"ok": False, "code": code, "msg": msg}).encode() + b"\n",
        st.integers(-5, 300) | st.none(),
        st.text(max_size=20),
    ),
    st.builds(lambda d: deep(d, "[") + b"\n", st.integers(0, 3000)),
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode() + b"\n"),
)
commands = st.sampled_from(["ADD", "DEL", "CHECK", "VERSION", "", "add", "GET"])
env_values = st.sampled_from(["", "c1", "/run/netns/p1", "eth0"]) | st.text(max_size=10)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    command=commands,
    env_extra=st.dictionaries(
        st.sampled_from(["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"]), env_values
    ),
    # Half raw stdin, half a network configuration.
    payload=st.booleans().flatmap(lambda raw: stdin_bytes if raw else configs),
    answer=agent_answers,
)
def test_fuzz_plugin_request_handling(
    tmp_path_factory: Any,
    command: str,
    env_extra: dict[str, str],
    payload: dict[str, Any] | bytes,
    answer: bytes,
) -> None:
    """`payload`: a network configuration (sent with this test's agent socket) or raw stdin."""
    sock = Path(tmp_path_factory.mktemp("agent")) / "cni.sock"
    # Never a socket outside this test (a fuzzed path must not reach a real node agent).
    if isinstance(payload, bytes):
        data = payload
    else:
        data = json.dumps({**payload, "agentSocket": str(sock)}).encode()
    out = io.StringIO()
    with fake_agent(sock, answer):
        rc = plugin.run({**ENV, **env_extra, "CNI_COMMAND": command}, io.BytesIO(data), out)
    check_contract(rc, out.getvalue(), command)
