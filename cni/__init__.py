"""cni: the chained CNI plugin and the node agent.

`plugin` (exec'd by the container runtime; pure spec logic in `spec`) asks the node `agent` over
`protocol` (JSON lines on a unix socket) to enroll or release a pod; the agent decides who is
ambient (`labels`, fed by `kubelabels` from the Kubernetes API) and drives the eBPF capture;
the agent's reconcile is planned by the pure `reconcile` and then applied; `install` writes the
chained conflist; `errors` carries the CNI error codes.
"""
