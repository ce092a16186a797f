// The agent's per-flow packet counter: a TC classifier (clsact, ingress and egress, direct
// action) on the Node's Pod-facing interfaces. Compiled by BCC at the agent's start; only
// UAPI headers, so Debian's generic headers do for any kernel with BTF.
//
// Every packet is counted once, in a PERCPU_HASH keyed by its flow as first seen (the
// 5-tuple plus IP version): where it enters from a Pod (ingress of the Pod's interface), or
// else where it leaves towards one (egress), unless it entered through an interface of
// `counted_ifaces` (then its ingress already counted it). A packet whose reverse flow is
// known is counted in that flow's reverse direction, so a connection is one entry. When an
// entry cannot be made (map full, allocation failure), the packet goes to the `fallback`
// ring buffer with the error, so userspace loses nothing and evicts early.
//
// The program never changes a verdict: it returns TC_ACT_UNSPEC (the next filter decides).

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#ifndef MAX_FLOWS
#define MAX_FLOWS 100000
#endif
#ifndef FALLBACK_PAGES
#define FALLBACK_PAGES 64
#endif
#define MAX_EXTENSION_HEADERS 6

struct flow_key {
    __u8 src[16];  // IPv4: the first 4 bytes
    __u8 dst[16];
    __u16 sport;   // host order; ICMP: 0
    __u16 dport;   // host order; ICMP: type * 256 + code
    __u8 proto;
    __u8 version;  // 4 or 6
    __u8 fragment; // 1: a fragment after the first (its ports are unknown: 0)
    __u8 pad;
};

struct flow_counts {
    __u64 packets;      // in the direction of the key
    __u64 bytes;        // IP bytes (header included), as conntrack counts them
    __u64 rev_packets;  // in the other direction
    __u64 rev_bytes;
    __u64 first_ns;     // bpf_ktime_get_ns() of the first and last packet on this CPU
    __u64 last_ns;
    __u32 flags;        // OR of the TCP flags of both directions
    __u32 pad;
};

struct fallback_record {
    struct flow_key key;
    __u64 ns;
    __u32 bytes;
    __u32 flags;
    __u8 reverse;  // the packet went the other way
    __u8 pad[3];
    __s32 error;   // what bpf_map_update_elem returned
};

BPF_PERCPU_HASH(flows, struct flow_key, struct flow_counts, MAX_FLOWS);
BPF_HASH(counted_ifaces, __u32, __u8, 4096);
BPF_RINGBUF_OUTPUT(fallback, FALLBACK_PAGES);
// Packets that found neither a map entry nor room in the ring buffer (never expected).
BPF_PERCPU_ARRAY(lost, __u64, 1);

struct vlan_header {
    __be16 tci;
    __be16 proto;
};

struct ipv6_option {
    __u8 next;
    __u8 length;
};

static __always_inline void swap_ends(struct flow_key *key) {
    struct flow_key copy = *key;
    __builtin_memcpy(key->src, copy.dst, 16);
    __builtin_memcpy(key->dst, copy.src, 16);
    key->sport = copy.dport;
    key->dport = copy.sport;
}

static __always_inline int count(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end)
        return TC_ACT_UNSPEC;
    __u16 l3 = eth->h_proto;
    __u32 offset = sizeof(*eth);
#pragma unroll
    for (int i = 0; i < 2; i++) {  // up to two VLAN tags (802.1Q, 802.1ad)
        if (l3 != htons(ETH_P_8021Q) && l3 != htons(ETH_P_8021AD))
            break;
        struct vlan_header *vlan = data + offset;
        if ((void *)(vlan + 1) > end)
            return TC_ACT_UNSPEC;
        l3 = vlan->proto;
        offset += sizeof(*vlan);
    }

    struct flow_key key = {};
    __u32 length = 0;
    __u8 proto = 0;
    void *l4 = 0;
    if (l3 == htons(ETH_P_IP)) {
        struct iphdr *ip = data + offset;
        if ((void *)(ip + 1) > end)
            return TC_ACT_UNSPEC;
        __builtin_memcpy(key.src, &ip->saddr, 4);
        __builtin_memcpy(key.dst, &ip->daddr, 4);
        key.version = 4;
        proto = ip->protocol;
        length = ntohs(ip->tot_len);
        if (ip->frag_off & htons(0x1fff))
            key.fragment = 1;
        __u32 header = ip->ihl * 4;
        if (header < sizeof(*ip))
            return TC_ACT_UNSPEC;
        l4 = (void *)ip + header;
    } else if (l3 == htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + offset;
        if ((void *)(ip6 + 1) > end)
            return TC_ACT_UNSPEC;
        __builtin_memcpy(key.src, &ip6->saddr, 16);
        __builtin_memcpy(key.dst, &ip6->daddr, 16);
        key.version = 6;
        length = ntohs(ip6->payload_len) + sizeof(*ip6);
        proto = ip6->nexthdr;
        void *cursor = ip6 + 1;
#pragma unroll
        for (int i = 0; i < MAX_EXTENSION_HEADERS; i++) {
            struct ipv6_option *option = cursor;
            if (proto == IPPROTO_HOPOPTS || proto == IPPROTO_ROUTING || proto == IPPROTO_DSTOPTS) {
                if ((void *)(option + 1) > end)
                    return TC_ACT_UNSPEC;
                proto = option->next;
                cursor += (option->length + 1) * 8;
            } else if (proto == IPPROTO_FRAGMENT) {
                __be16 *fragment = cursor + 2;  // offset and flags
                if ((void *)(fragment + 1) > end)
                    return TC_ACT_UNSPEC;
                if (*fragment & htons(0xfff8))
                    key.fragment = 1;
                proto = option->next;
                cursor += 8;
            } else if (proto == IPPROTO_AH) {
                if ((void *)(option + 1) > end)
                    return TC_ACT_UNSPEC;
                proto = option->next;
                cursor += (option->length + 2) * 4;
            } else {
                break;
            }
        }
        l4 = cursor;
    } else {
        return TC_ACT_UNSPEC;  // not IP: not a flow of ours
    }
    key.proto = proto;

    __u32 flags = 0;
    int reverse = 0;
    if (!key.fragment) {
        if (proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP) {
            __be16 *ports = l4;
            if ((void *)(ports + 2) > end)
                return TC_ACT_UNSPEC;
            key.sport = ntohs(ports[0]);
            key.dport = ntohs(ports[1]);
            if (proto == IPPROTO_TCP) {
                __u8 *tcp_flags = l4 + 13;
                if ((void *)(tcp_flags + 1) > end)
                    return TC_ACT_UNSPEC;
                flags = *tcp_flags;
            }
        } else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
            __u8 *icmp = l4;
            if ((void *)(icmp + 2) > end)
                return TC_ACT_UNSPEC;
            __u8 type = icmp[0];
            // An echo reply belongs to its request's flow, in reverse (as conntrack has it).
            if ((proto == IPPROTO_ICMP && type == 0) || (proto == IPPROTO_ICMPV6 && type == 129)) {
                type = proto == IPPROTO_ICMP ? 8 : 128;
                swap_ends(&key);
                reverse = 1;
            }
            key.dport = ((__u16)type << 8) | icmp[1];
        }
    }

    __u64 now = bpf_ktime_get_ns();
    struct flow_counts *counts = flows.lookup(&key);
    if (!counts && !reverse) {
        struct flow_key other = key;
        swap_ends(&other);
        counts = flows.lookup(&other);
        if (counts) {
            key = other;
            reverse = 1;
        }
    }
    if (!counts) {
        struct flow_counts zero = {};
        int error = flows.insert(&key, &zero);
        if (error == 0 || error == -17 /* EEXIST: another CPU made it */)
            counts = flows.lookup(&key);
        if (!counts) {
            struct fallback_record *record = fallback.ringbuf_reserve(sizeof(*record));
            if (!record) {
                __u32 zero_index = 0;
                __u64 *missed = lost.lookup(&zero_index);
                if (missed)
                    *missed += 1;
                return TC_ACT_UNSPEC;
            }
            record->key = key;
            record->ns = now;
            record->bytes = length;
            record->flags = flags;
            record->reverse = reverse;
            record->error = error;
            fallback.ringbuf_submit(record, 0);
            return TC_ACT_UNSPEC;
        }
    }
    if (reverse) {
        counts->rev_packets += 1;
        counts->rev_bytes += length;
    } else {
        counts->packets += 1;
        counts->bytes += length;
    }
    if (counts->first_ns == 0)
        counts->first_ns = now;
    counts->last_ns = now;
    counts->flags |= flags;
    return TC_ACT_UNSPEC;
}

int flow_ingress(struct __sk_buff *skb) {
    return count(skb);
}

int flow_egress(struct __sk_buff *skb) {
    __u32 from = skb->ingress_ifindex;
    if (from && counted_ifaces.lookup(&from))
        return TC_ACT_UNSPEC;  // counted where it came in
    return count(skb);
}
