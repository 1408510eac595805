"""meshcore.hbone: HBONE, HTTP/2 CONNECT over mutual TLS (docs/reference/ambient-facts.md).

`frames` and `headers` are the HTTP/2 frame layout and HPACK without dynamic tables,
`connection` the sans-I/O connection (RFC 9113), `aio` its asyncio edge (the protocol, tunnel
streams, `connect`, `accept_tls`), `h3` and `h3aio` the same over HTTP/3 (RFC 9114 CONNECT on
aioquic: sans-I/O core and asyncio edge), `pool` the client connection pool.
"""
