"""controlplane: the `ambient-controlplane` process (docs/controlplane.md).

Config sources (`sources/`: Kubernetes list+watch, or a manifest directory) feed the `store` with
strictly parsed `objects`; `translate` (pure) turns the store into the node proxies' xDS records
(`translator` memoises it per namespace and yields deltas) and `l7` into the waypoints' L7
resources; `xds` serves them over delta ADS; `ca` signs workload
certificates after `auth` authenticated the caller; `waypoints` reconciles waypoint Deployments;
`status` writes findings back into the objects' status; `debug` and `metrics` are the operator
endpoints; `app` is the process; `errors` carries the gRPC status codes.
"""
