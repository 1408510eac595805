"""`ambientctl lab`: a whole ambient mesh on one machine (nodes and pods as network namespaces,
node proxies fed by one control plane).

Modules: `manifests` (pure: Kubernetes-style YAML -> LabSpec, and the Pod/Namespace documents the
lab writes back), `topology` (pure: names and addresses), `system` (the I/O edge: ip, nsenter,
processes, CNI exec), `lab` (the order of up/down) built from `state`, `cluster` (manifest
directory, underlay), `processes` (agents, control plane, node proxies) and `pods` (pods, waypoint
pods, exec, label), `waypoints` (pure: waypoint pods for the lab's waypoint Gateways), `kube`
and `kubelet` (a real Kubernetes control plane on this machine, lab nodes as its nodes;
`podspec` and `probes` are the kubelet's pure part),
`kubelab` (`lab up --kube`: the lab's nodes as nodes of that cluster, one kubelet process per
node), `container` (a container's mount namespace: its volumes at their paths), `kubeproxy`
(the lab's kube-proxy: ClusterIP DNAT in a node's netns), `demo`, `demo_waypoint` and
`demo_kube` (the README demos; `kubeflow` holds the kube demo's steps, which its test runs
too), `loopback_demo` (the unprivileged demo: two node
proxies on 127.0.0.0/8 with static config, `scripts/demo --loopback`).
"""
