"""Protocol buffers of the control-plane contract (Istio-compatible names and numbers).

Owns: our own .proto files (workload, authorization, discovery = delta xDS, ca, l7, and
ambientmesh: our own extension messages carried in Istio's ``Workload.extensions``) and the
code generated from them by ``scripts/gen-proto`` (``*_pb2.py`` + ``.pyi``; never edited by
hand), plus `convert`, the only place that maps between the records of `meshcore.model` and the
wire messages, `l7res` (the waypoint's ``ambient.l7.Resource`` packing) and `yamlform` (the same
records' dict form: strict YAML/JSON decoding, static `MeshConfig` loading).
"""
