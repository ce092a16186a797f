"""Builders shared by the agent's unit tests: conntrack entries as the parser returns them,
Kubernetes objects and metadata stores for enrichment, connection stores fed from lists of
entries, and agent config errors. Test modules import it as a sibling (`import agentkit`),
as pytest puts this folder on sys.path."""

import socket

import pytest

from antrea_flow.configfile import ConfigError
from antrea_flow.conntrack.parser import TCP_STATES, Dump, Entry
from antrea_flow.exporter.config import load_agent_config
from antrea_flow.k8s.stores import MetadataStore

ZONE = 65520  # Antrea's conntrack zone
ACTIVE, IDLE = 60.0, 15.0  # activeFlowExportTimeout, idleFlowExportTimeout (defaults)
ESTABLISHED = TCP_STATES.index("ESTABLISHED")
TIME_WAIT = TCP_STATES.index("TIME_WAIT")
_ICMP_PROTOS = (1, 58)

# -- conntrack entries --------------------------------------------------------------------


def ip(text):
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


def conntrack_entry(
    src="10.10.1.5",
    dst="10.10.1.6",
    counters=(10, 1000, 8, 800),
    *,
    sport=40000,
    dport=8080,
    service=None,
    proto=6,
    tcp=ESTABLISHED,
    status=0,
    mark=0x2,
    ct_labels=b"",
    ct_id=1,
    start_ns=1_000_000_000_000,
    stop_ns=0,
    zone=ZONE,
):
    """The Entry of src:sport -> dst:dport; `service` is the (address, port) dialled when
    dst:dport is the backend it was DNATed to; `counters` are (packets, bytes, reply
    packets, reply bytes). ICMP has no ports: sport and dport carry the id and type/code
    as the kernel reports them."""
    orig_dst, orig_dport = service or (dst, dport)
    if proto in _ICMP_PROTOS:
        return Entry(proto, ip(src), ip(orig_dst), 0, dport, ip(dst), ip(src), 0, sport, zone,
                     status, mark, ct_labels, *counters, start_ns, stop_ns, -1, ct_id)  # fmt: skip
    return Entry(
        proto, ip(src), ip(orig_dst), sport, orig_dport, ip(dst), ip(src), dport, sport,
        zone, status, mark, ct_labels, *counters, start_ns, stop_ns,
        tcp if proto == 6 else -1, ct_id,
    )  # fmt: skip


def counted_entry(pkts=1, octets=100, rpkts=1, roctets=60, **fields):
    """conntrack_entry with its counters first, for tests that change them poll by poll."""
    return conntrack_entry(counters=(pkts, octets, rpkts, roctets), **fields)


def poll(store, entries, now):
    """One poll of `store` in which conntrack holds exactly `entries`."""
    store.update(Dump.of(entries), now)


def ct_id(connection):
    """The conntrack id of a stored connection (the high half of its handle)."""
    return connection.handle >> 32


def deltas(export):
    """An export's (packets, bytes, reply packets, reply bytes) since the previous one."""
    return (
        export.packet_delta,
        export.octet_delta,
        export.reverse_packet_delta,
        export.reverse_octet_delta,
    )


# -- Kubernetes metadata ------------------------------------------------------------------


def node(name, *cidrs):
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "spec": {"podCIDRs": list(cidrs)}}  # fmt: skip


def pod(namespace, name, node_name, *ips):
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name},
        "spec": {"nodeName": node_name},
        "status": {"podIPs": [{"ip": i} for i in ips]},
    }


def metadata_store(objects):
    store = MetadataStore()
    store.replace(objects)
    return store


def labels(ingress=0, egress=0):
    """conntrack labels carrying the ingress and egress rule ids, as the agent's rules set
    them."""
    return bytes(8) + egress.to_bytes(4, "big") + ingress.to_bytes(4, "big")


# -- agent config -------------------------------------------------------------------------


def config_error(path):
    """The message of the ConfigError loading `path` raises; it must be one line."""
    with pytest.raises(ConfigError) as info:
        load_agent_config(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    return message
