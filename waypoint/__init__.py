"""waypoint: the L7 proxy for the services and workloads bound to it (docs/waypoint.md).

`app` is the process; `server` accepts HBONE on 15008 and dispatches the HTTP/1.1 (`http1`) or
HTTP/2 (`http2`) inside each tunnel (`tunnel`, `body`); `handler` routes, authorizes and retries
each request; `upstream` opens the onward connections; `xds` takes config from the control
plane; `metrics` is Istio's HTTP telemetry; `errors` carries status and response flag. The pure
HTTP/L7 logic it uses is `meshcore.l7`.
"""
