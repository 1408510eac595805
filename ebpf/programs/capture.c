// SPDX-License-Identifier: Apache-2.0
//
// ambient-mesh transparent capture: tc (cls_bpf, direct-action) programs on clsact INGRESS.
//
//   capture_pod     on every enrolled / observed pod's host-side veth (ingress = leaving the pod)
//   capture_uplink  on the node's uplink (traffic arriving from other hosts)
//   capture_bridge  on the bridge device (e.g. cni0) whose ports are pod veths (CNI `bridge`)
//
// Both steer TCP to the node proxy with bpf_sk_assign() and set OUR mark bit so that the
// policy-routing rule (fwmark MARK/MASK -> table with "local 0.0.0.0/0 dev lo") delivers the
// packet locally, where the assigned socket receives it. Nothing in the packet is rewritten:
// the accepted socket's local address is the ORIGINAL destination.
//
// Kernel helper semantics relied on (include/uapi/linux/bpf.h, "bpf-helpers(7)"):
//   bpf_skc_lookup_tcp(ctx, tuple, size, netns, flags): "Look for TCP socket matching tuple,
//     optionally in a child network namespace netns" -- returns full, request AND timewait
//     sockets (struct sock_common). Used for the "does a socket already own this flow" check,
//     so the third ACK of a handshake (request socket) is not misrouted.
//   bpf_sk_lookup_tcp(...): same, but only full sockets; used to find the proxy LISTENER.
//     netns BPF_F_CURRENT_NETNS = the netns of skb->dev (the node netns).
//   bpf_sk_assign(skb, sk, 0): "Assign the sk to the skb. When combined with appropriate routing
//     configuration to receive the packet towards the socket, will cause skb to be delivered to
//     the specified socket ... only valid from TC ingress path." -ENETUNREACH for another netns.
//   bpf_sk_release(sk): every non-NULL lookup result must be released (verifier-enforced).
//
// Bridge ports (CNI `bridge` plugin: pod veths enslaved to cni0, which holds the gateway IP).
// A port's frames never reach the IP stack through the veth: the bridge's rx_handler
// (br_handle_frame) takes them after tc ingress and either forwards them at L2 to another port
// (same-subnet pod -> pod: the node's IP stack never sees them) or passes them up through the
// bridge device (br_pass_frame_up -> netif_receive_skb(cni0)). On the way, br_netfilter
// (bridge-nf-call-iptables=1, the default of every netns) runs the IPv4 PREROUTING hooks from
// NF_BR_PRE_ROUTING, and its setup_pre_routing() calls skb_orphan() unconditionally ("Must drop
// socket now because of tproxy"), unlike ip_rcv_core(), which keeps a bpf_sk_assign()ed socket
// (skb_sk_is_prefetched). The mark survives. So on a bridge port, a steered packet needs:
//   1. its destination MAC set to the bridge's own MAC (ports map), so the bridge passes it up
//      (br_handle_frame sets PACKET_HOST only for the bridge's dev_addr) instead of forwarding it
//      at L2 to the destination pod;
//   2. the assignment done again at the bridge device's tc ingress (capture_bridge), which runs
//      after the bridge hooks and before ip_rcv. It acts only on packets carrying OUR mark bit,
//      which only capture_pod sets, after anti-spoofing, and which a pod cannot forge (marks are
//      scrubbed when crossing the veth from the pod's netns).
//
// Invariants:
//   * Only packets whose source or destination is an ENROLLED pod are ever assigned or marked;
//     everything else (non-mesh pods, host traffic) passes untouched (TC_ACT_OK, mark unchanged).
//   * The mark is OR-ed in under our mask only: (mark & ~mask) | (our_mark & mask).
//   * Anti-spoofing: on a pod veth, an IPv4 packet whose source is not that veth's pod is dropped.
//   * Fail-closed (config flag): a new TCP connection (SYN) to or from an enrolled pod that finds
//     no proxy listener is dropped instead of leaking in plaintext.
//   * IPv4 only. Non-IPv4 frames (ARP, IPv6) pass unchanged (IPv6 is documented as not done).
//
// The loader substitutes the node's bpffs directory for the PIN_DIR placeholder (written with '@'
// on both sides in the map declarations below); bcc creates the pinned maps there on first load and re-uses them afterwards (BPF_TABLE_PINNED), which is how
// enrollment survives a restart of the agent.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

#define POD_ENROLLED 1
#define POD_OBSERVED 2
#define CFG_FAIL_CLOSED 1

#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10

// Keep in sync with ebpf/maps.py (STATS).
enum stat_index {
    ST_OUTBOUND = 0,      // enrolled pod SYN -> outbound listener
    ST_INBOUND,           // SYN to an enrolled pod -> inbound plaintext listener
    ST_HBONE,             // SYN to an enrolled pod's :15008 -> HBONE listener
    ST_ESTABLISHED,       // packet of a flow owned by a local socket -> that socket
    ST_SPOOF_DROP,        // pod veth: source IP is not the pod's
    ST_NO_LISTENER_DROP,  // fail-closed: no proxy listener
    ST_NO_LISTENER_PASS,  // fail-open: no proxy listener
    ST_ASSIGN_ERROR,      // bpf_sk_assign refused (or a bridge port's MAC rewrite failed)
    ST_BRIDGE,            // a steered packet assigned again at the bridge device
    ST_MAX,
};

struct pod_entry {
    __u32 ifindex;   // host-side veth the pod's packets must arrive on
    __u32 flags;     // POD_ENROLLED | POD_OBSERVED
    char ifname[16];
    char uid[64];
};

struct capture_config {
    __u32 mark;
    __u32 mask;
    __u32 outbound_port;
    __u32 inbound_port;
    __u32 hbone_port;
    __u32 flags;     // CFG_FAIL_CLOSED
};

BPF_TABLE_PINNED("hash", __u32, struct pod_entry, pods, 16384, "@PIN_DIR@/pods");
BPF_TABLE_PINNED("array", __u32, struct capture_config, config, 1, "@PIN_DIR@/config");
BPF_TABLE_PINNED("percpu_array", __u32, __u64, stats, ST_MAX, "@PIN_DIR@/stats");

// Pod veths that are ports of a bridge: key = veth ifindex.
struct port_entry {
    __u32 bridge_ifindex;
    __u8 mac[6];     // the bridge device's own MAC address
    __u16 pad;
};

BPF_TABLE_PINNED("hash", __u32, struct port_entry, ports, 16384, "@PIN_DIR@/ports");

struct flow {
    __u32 saddr;    // network byte order, as on the wire
    __u32 daddr;
    __u16 sport;
    __u16 dport;
    __u8 proto;
    __u8 tcp_flags;
    __u8 l4;        // 1 when ports/flags were read (TCP, first fragment)
};

static __always_inline void count(__u32 idx) {
    __u64 *v = stats.lookup(&idx);
    if (v)
        *v += 1;  // per-CPU slot: no atomics needed
}

// 0 = IPv4 parsed into *f; -1 = not IPv4 (pass). Assumes an Ethernet device (veth, physical NIC).
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct flow *f) {
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return -1;
    struct iphdr iph;
    if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)) < 0)
        return -1;
    f->saddr = iph.saddr;
    f->daddr = iph.daddr;
    f->proto = iph.protocol;
    f->l4 = 0;
    if (iph.protocol != IPPROTO_TCP)
        return 0;
    if (iph.frag_off & bpf_htons(0x1fff))  // non-first fragment: no TCP header here
        return 0;
    __u32 off = ETH_HLEN + ((__u32)iph.ihl & 0xf) * 4;
    struct tcphdr th;
    if (bpf_skb_load_bytes(skb, off, &th, sizeof(th)) < 0)
        return 0;
    f->sport = th.source;
    f->dport = th.dest;
    f->tcp_flags = ((__u8 *)&th)[13];
    f->l4 = 1;
    return 0;
}

static __always_inline void set_mark(struct __sk_buff *skb, struct capture_config *cfg) {
    skb->mark = (skb->mark & ~cfg->mask) | (cfg->mark & cfg->mask);
}

// A non-LISTEN socket of the node netns already owns this 4-tuple (proxy's accepted socket,
// proxy's transparent upstream socket, request/timewait sockets): assign it. 1 = handled.
static __always_inline int assign_established(struct __sk_buff *skb, struct flow *f,
                                              struct capture_config *cfg, __u32 stat) {
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = f->saddr;
    tuple.ipv4.daddr = f->daddr;
    tuple.ipv4.sport = f->sport;
    tuple.ipv4.dport = f->dport;
    struct bpf_sock *est = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4),
                                              BPF_F_CURRENT_NETNS, 0);
    if (!est)
        return 0;
    if (est->state == BPF_TCP_LISTEN) {
        bpf_sk_release(est);
        return 0;
    }
    long err = bpf_sk_assign(skb, est, 0);
    bpf_sk_release(est);
    if (err) {
        count(ST_ASSIGN_ERROR);
        return 0;
    }
    set_mark(skb, cfg);
    count(stat);
    return 1;
}

// A new connection (SYN): hand it to the proxy listener on `port` (bound 0.0.0.0 or 127.0.0.1,
// IP_TRANSPARENT). The lookup tuple's daddr is loopback so either binding matches.
// Returns STEERED (assigned + marked), PASS (fail-open, untouched) or DROP (fail-closed).
#define STEERED 1
#define PASS 0
#define DROP (-1)
static __always_inline int to_listener(struct __sk_buff *skb, struct flow *f,
                                       struct capture_config *cfg, __u32 port, __u32 stat) {
    struct bpf_sock_tuple tuple = {};
    tuple.ipv4.saddr = f->saddr;
    tuple.ipv4.sport = f->sport;
    tuple.ipv4.daddr = bpf_htonl(0x7f000001);
    tuple.ipv4.dport = bpf_htons((__u16)port);
    struct bpf_sock *lsk = bpf_sk_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4),
                                             BPF_F_CURRENT_NETNS, 0);
    long err = -1;
    if (lsk) {
        if (lsk->state == BPF_TCP_LISTEN)
            err = bpf_sk_assign(skb, lsk, 0);
        bpf_sk_release(lsk);
    }
    if (err == 0) {
        set_mark(skb, cfg);
        count(stat);
        return STEERED;
    }
    if (lsk)
        count(ST_ASSIGN_ERROR);
    if (cfg->flags & CFG_FAIL_CLOSED) {
        count(ST_NO_LISTENER_DROP);
        return DROP;
    }
    count(ST_NO_LISTENER_PASS);
    return PASS;
}

static __always_inline int is_syn(struct flow *f) {
    return (f->tcp_flags & TCP_FLAG_SYN) && !(f->tcp_flags & TCP_FLAG_ACK);
}

// Inbound port choice: HBONE (dport == hbone port) or plaintext.
static __always_inline int to_inbound(struct __sk_buff *skb, struct flow *f,
                                      struct capture_config *cfg, __u32 plain, __u32 hbone) {
    if (f->dport == bpf_htons((__u16)cfg->hbone_port))
        return to_listener(skb, f, cfg, cfg->hbone_port, hbone);
    return to_listener(skb, f, cfg, cfg->inbound_port, plain);
}

static __always_inline int verdict(int r) {
    return r == DROP ? TC_ACT_SHOT : TC_ACT_OK;
}

// A packet steered on a bridge port must reach the node's IP stack through the bridge device:
// address it to the bridge (see the header). Returns DROP if the rewrite failed: letting the
// frame be forwarded at L2 with our socket assigned would bypass the proxy.
static __always_inline int up_to_bridge(struct __sk_buff *skb, int r) {
    if (r != STEERED)
        return r;
    __u32 ifindex = skb->ifindex;
    struct port_entry *port = ports.lookup(&ifindex);
    if (!port)
        return r;  // routed veth (ptp): already addressed to this host
    __u8 dst[6];
    if (bpf_skb_load_bytes(skb, 0, dst, sizeof(dst)) < 0)
        goto fail;
    int same = 1;  // byte loop, not memcmp: bcc has no libc to call
#pragma unroll
    for (int i = 0; i < 6; i++)
        if (dst[i] != port->mac[i])
            same = 0;
    if (same)
        return r;  // addressed to the gateway (the bridge) already
    if (bpf_skb_store_bytes(skb, 0, port->mac, sizeof(dst), 0) < 0)
        goto fail;
    return r;
fail:
    count(ST_ASSIGN_ERROR);
    return DROP;
}

int capture_pod(struct __sk_buff *skb) {
    struct flow f = {};
    if (parse_ipv4(skb, &f) < 0)
        return TC_ACT_OK;
    __u32 zero = 0;
    struct capture_config *cfg = config.lookup(&zero);
    if (!cfg)
        return TC_ACT_OK;

    // Anti-spoofing: the source must be the pod that owns this veth.
    struct pod_entry *src = pods.lookup(&f.saddr);
    if (!src || src->ifindex != skb->ifindex) {
        count(ST_SPOOF_DROP);
        return TC_ACT_SHOT;
    }
    if (f.proto != IPPROTO_TCP || !f.l4)
        return TC_ACT_OK;
    int src_enrolled = src->flags & POD_ENROLLED;
    struct pod_entry *dst = pods.lookup(&f.daddr);
    int dst_enrolled = dst && (dst->flags & POD_ENROLLED);
    if (!src_enrolled && !dst_enrolled)
        return TC_ACT_OK;  // non-mesh to non-mesh: untouched

    if (assign_established(skb, &f, cfg, ST_ESTABLISHED))
        return verdict(up_to_bridge(skb, STEERED));
    if (!is_syn(&f))
        return TC_ACT_OK;  // mid-flow packet with no local owner (e.g. pre-enrollment flow)
    int r;
    if (src_enrolled)
        r = to_listener(skb, &f, cfg, cfg->outbound_port, ST_OUTBOUND);
    else
        r = to_inbound(skb, &f, cfg, ST_INBOUND, ST_HBONE);  // same-node non-mesh -> enrolled
    return verdict(up_to_bridge(skb, r));
}

int capture_uplink(struct __sk_buff *skb) {
    struct flow f = {};
    if (parse_ipv4(skb, &f) < 0)
        return TC_ACT_OK;
    if (f.proto != IPPROTO_TCP || !f.l4)
        return TC_ACT_OK;
    struct pod_entry *dst = pods.lookup(&f.daddr);
    if (!dst || !(dst->flags & POD_ENROLLED))
        return TC_ACT_OK;
    __u32 zero = 0;
    struct capture_config *cfg = config.lookup(&zero);
    if (!cfg)
        return TC_ACT_OK;
    if (assign_established(skb, &f, cfg, ST_ESTABLISHED))
        return TC_ACT_OK;
    if (!is_syn(&f))
        return TC_ACT_OK;
    return verdict(to_inbound(skb, &f, cfg, ST_INBOUND, ST_HBONE));
}

// Bridge device ingress: a packet capture_pod steered on one of the bridge's ports, passed up
// by the bridge, possibly orphaned by br_netfilter on the way. Redo the same decision (the
// kernel's socket tables decide, so it is the same one) and assign again. Everything without
// our mark bit (non-mesh traffic, ports we are not attached to) passes untouched. Counters:
// only ST_BRIDGE (the decision was counted once, on the veth), plus drops.
int capture_bridge(struct __sk_buff *skb) {
    struct flow f = {};
    if (parse_ipv4(skb, &f) < 0)
        return TC_ACT_OK;
    if (f.proto != IPPROTO_TCP || !f.l4)
        return TC_ACT_OK;
    __u32 zero = 0;
    struct capture_config *cfg = config.lookup(&zero);
    if (!cfg)
        return TC_ACT_OK;
    if ((skb->mark & cfg->mask) != (cfg->mark & cfg->mask))
        return TC_ACT_OK;
    struct pod_entry *src = pods.lookup(&f.saddr);
    int src_enrolled = src && (src->flags & POD_ENROLLED);
    struct pod_entry *dst = pods.lookup(&f.daddr);
    int dst_enrolled = dst && (dst->flags & POD_ENROLLED);
    if (!src_enrolled && !dst_enrolled)
        return TC_ACT_OK;  // unenrolled since the veth saw it: local delivery by mark only
    if (assign_established(skb, &f, cfg, ST_BRIDGE))
        return TC_ACT_OK;
    if (!is_syn(&f))
        return TC_ACT_OK;  // its owner closed in between: the TCP stack answers by 4-tuple
    if (src_enrolled)
        return verdict(to_listener(skb, &f, cfg, cfg->outbound_port, ST_BRIDGE));
    return verdict(to_inbound(skb, &f, cfg, ST_BRIDGE, ST_BRIDGE));
}
