"""`ambientctl lab`: a whole ambient mesh on one machine (nodes and pods as network namespaces).

Modules: `manifests` (pure: Kubernetes-style YAML -> LabSpec, LabSpec -> mesh config),
`topology` (pure: names and addresses), `system` (the I/O edge: ip, nsenter, processes, CNI
exec), `lab` (up/down/pods/exec/label), `demo` (the README demo).
"""
