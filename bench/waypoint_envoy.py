"""Envoy as the waypoint benchmark's oracle (`bench.waypoint_bench`): its configuration in the
shape Istio's waypoint uses (HBONE listener -> CONNECT terminated into an internal listener ->
HTTP routing with the same weighted routes as ours -> HBONE to each endpoint's node proxy), and
its certificates from our CA.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def _cluster(name: str, address: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "connect_timeout": "2s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
        **extra,
    }


def _router() -> list[dict[str, Any]]:
    router = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    return [{"name": "envoy.filters.http.router", "typed_config": {"@type": router}}]


def envoy_waypoint_config(
    certs: dict[str, Path], *, listen_ip: str, endpoints: dict[str, str]
) -> dict[str, Any]:
    """Envoy as a waypoint, in the shape Istio's waypoint uses: HBONE listener -> CONNECT
    terminated into the internal listener ``main_internal`` -> HTTP routing (weighted clusters)
    -> each cluster (`endpoints`: subset name -> endpoint IP) is an internal listener whose
    tcp_proxy tunnels over HBONE (mTLS, h2 CONNECT with :authority endpoint:8080) to the
    endpoint's node proxy."""
    tls_params = {
        "tls_minimum_protocol_version": "TLSv1_3",
        "tls_maximum_protocol_version": "TLSv1_3",
    }
    h2 = {"initial_stream_window_size": 4 << 20, "initial_connection_window_size": 16 << 20}
    hcm_type = (
        "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
        "v3.HttpConnectionManager"
    )
    cert = [
        {
            "certificate_chain": {"filename": str(certs["chain"])},
            "private_key": {"filename": str(certs["key"])},
        }
    ]
    downstream_tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_params": tls_params,
                "alpn_protocols": ["h2"],
                "tls_certificates": cert,
                "validation_context": {"trusted_ca": {"filename": str(certs["root"])}},
            },
        },
    }
    hbone_in = {
        "name": "hbone_in",
        "address": {"socket_address": {"address": listen_ip, "port_value": 15008}},
        "filter_chains": [
            {
                "transport_socket": downstream_tls,
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": hcm_type,
                            "stat_prefix": "hbone_in",
                            "codec_type": "HTTP2",
                            "http2_protocol_options": {
                                **h2,
                                "allow_connect": True,
                                "max_concurrent_streams": 200,
                            },
                            "upgrade_configs": [{"upgrade_type": "CONNECT"}],
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"connect_matcher": {}},
                                                "route": {
                                                    "cluster": "main_internal",
                                                    "upgrade_configs": [
                                                        {
                                                            "upgrade_type": "CONNECT",
                                                            "connect_config": {},
                                                        }
                                                    ],
                                                },
                                            }
                                        ],
                                    }
                                ]
                            },
                            "http_filters": _router(),
                        },
                    }
                ],
            }
        ],
    }
    main_internal = {
        "name": "main_internal",
        "internal_listener": {},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": hcm_type,
                            "stat_prefix": "l7",
                            "codec_type": "AUTO",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "reviews",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"prefix": "/"},
                                                "route": {
                                                    "weighted_clusters": {
                                                        "clusters": [
                                                            {"name": "v1", "weight": 90},
                                                            {"name": "v2", "weight": 10},
                                                        ]
                                                    }
                                                },
                                            }
                                        ],
                                    }
                                ]
                            },
                            "http_filters": _router(),
                        },
                    }
                ]
            }
        ],
    }
    listeners: list[dict[str, Any]] = [hbone_in, main_internal]
    clusters: list[dict[str, Any]] = [
        _cluster(
            "main_internal", {"envoy_internal_address": {"server_listener_name": "main_internal"}}
        ),
    ]
    for name, ip in endpoints.items():
        listeners.append(
            {
                "name": f"connect_{name}",
                "internal_listener": {},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.tcp_proxy",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions."
                                    "filters.network.tcp_proxy.v3.TcpProxy",
                                    "stat_prefix": f"tunnel_{name}",
                                    "cluster": f"hbone_{name}",
                                    "tunneling_config": {"hostname": f"{ip}:8080"},
                                },
                            }
                        ]
                    }
                ],
            }
        )
        clusters.append(
            _cluster(name, {"envoy_internal_address": {"server_listener_name": f"connect_{name}"}})
        )
        clusters.append(
            _cluster(
                f"hbone_{name}",
                {"socket_address": {"address": ip, "port_value": 15008}},
                typed_extension_protocol_options={
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                        "HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": h2},
                    }
                },
                transport_socket={
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                        "UpstreamTlsContext",
                        "common_tls_context": {
                            "tls_params": tls_params,
                            "alpn_protocols": ["h2"],
                            "tls_certificates": cert,
                            "validation_context": {
                                "trusted_ca": {"filename": str(certs["root"])},
                                "match_typed_subject_alt_names": [
                                    {
                                        "san_type": "URI",
                                        "matcher": {
                                            "exact": "spiffe://cluster.local/ns/default/sa/reviews"
                                        },
                                    }
                                ],
                            },
                        },
                    },
                },
            )
        )
    return {
        "admin": {"address": {"socket_address": {"address": listen_ip, "port_value": 15000}}},
        "bootstrap_extensions": [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3."
                    "InternalListener"
                },
            }
        ],
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def envoy_certs(work: Path, ca_dir: Path) -> dict[str, Path]:
    from meshcore.ca import MeshCA
    from meshcore.identity import SpiffeId

    ca = MeshCA.load_or_create(ca_dir, trust_domain="cluster.local")
    ident = SpiffeId(
        trust_domain="cluster.local", namespace="default", service_account="waypoint-envoy"
    )
    wc = ca.issue(ident, now=datetime.now(UTC))
    out = {
        "chain": work / "envoy-chain.pem",
        "key": work / "envoy-key.pem",
        "root": work / "envoy-root.pem",
    }
    out["chain"].write_bytes(b"".join(wc.chain_pem))
    out["key"].write_bytes(wc.key_pem)
    out["root"].write_bytes(wc.roots_pem)
    return out
