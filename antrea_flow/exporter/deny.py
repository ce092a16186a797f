"""The deny store: connections the dataplane denied, built from the denied packets it hands
to the agent (each packet's mark is the id of the rule that denies it).

Packets are deduplicated by 5-tuple into connections with packet and byte counts (bytes are
IP lengths, as upstream) and first/last-seen times. A connection is exported when no denied
packet has been seen for the idle timeout (flowEndReason 3, as upstream's deny records) or,
while packets keep coming, every active timeout (reason 2). Recording is rate-limited; every
packet not recorded is counted by reason.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..codes import END_ACTIVE, END_OF_FLOW
from ..conntrack.parser import Entry
from ..flowkey import FlowKey
from ..k8s.stores import PolicyRule
from ..logutil import LogOnce
from .connections import Connection, Export
from .enrich import FlowMeta

log = logging.getLogger(__name__)

_PORTS = struct.Struct(">HH")
_ICMP = {1, 58}
_WITH_PORTS = {6, 17, 132, 136}  # TCP, UDP, SCTP, UDP-Lite
_IPV6_EXTENSIONS = {0, 43, 44, 60}  # hop-by-hop, routing, fragment, destination options


class BadPacket(ValueError):
    pass


def packet_key(packet: bytes) -> tuple[FlowKey[bytes], int]:
    """(the packet's 5-tuple, its IP length)."""
    if len(packet) < 20:
        raise BadPacket(f"{len(packet)} bytes is no IP packet")
    version = packet[0] >> 4
    if version == 4:
        header = (packet[0] & 0x0F) * 4
        proto = packet[9]
        source, destination = packet[12:16], packet[16:20]
        length = int.from_bytes(packet[2:4], "big")
    elif version == 6:
        if len(packet) < 40:
            raise BadPacket("truncated IPv6 header")
        proto, header = packet[6], 40
        source, destination = packet[8:24], packet[24:40]
        length = 40 + int.from_bytes(packet[4:6], "big")
        while proto in _IPV6_EXTENSIONS and header + 8 <= len(packet):
            size = 8 if proto == 44 else (packet[header + 1] + 1) * 8  # fragment: fixed
            proto, header = packet[header], header + size
    else:
        raise BadPacket(f"IP version {version}")
    sport = dport = 0
    if proto in _WITH_PORTS and header + 4 <= len(packet):
        sport, dport = _PORTS.unpack_from(packet, header)
    elif proto in _ICMP and header + 2 <= len(packet):
        dport = packet[header] << 8 | packet[header + 1]
    return FlowKey(source, destination, proto, sport, dport), length


@dataclass(slots=True)
class DenyStats:
    recorded: int = 0  # packets counted into deny connections
    not_recorded: Counter[str] = field(default_factory=Counter)  # packets, by reason


@dataclass(frozen=True, slots=True)
class DenyCounts:
    """A copy of the deny store's size and packet outcomes, taken under its lock."""

    connections: int
    recorded: int
    not_recorded: dict[str, int]


class DenyStore:
    """Denied connections of one Node. `observe` runs on the deny-queue thread, `expire` on
    the agent's loop; both hold the store's lock, and other readers take `counts()`. The
    connections it exports are read through the Export's copy of their counters."""

    def __init__(
        self,
        rule: Callable[[int], PolicyRule | None],
        enrich: Callable[[Entry], FlowMeta | None],
        active_timeout: float,
        idle_timeout: float,
        record_rate: float,
        clock: Callable[[], float],
    ):
        self.rule = rule
        self.enrich = enrich
        self.active_timeout = active_timeout
        self.idle_timeout = idle_timeout
        self.record_rate = record_rate
        self.clock = clock
        self.stats = DenyStats()
        self._connections: dict[FlowKey[bytes], Connection] = {}
        self._lock = threading.Lock()
        self._tokens = record_rate
        self._refilled = clock()
        self._log_once = LogOnce(log)

    def __len__(self) -> int:
        return len(self._connections)

    def counts(self) -> DenyCounts:
        with self._lock:
            stats = self.stats
            return DenyCounts(len(self._connections), stats.recorded, dict(stats.not_recorded))

    def denies(self, key: FlowKey[bytes]) -> bool:
        """A denied connection of this 5-tuple is being recorded (any thread)."""
        with self._lock:
            return key in self._connections

    def _admit(self, now: float) -> bool:
        """Token bucket of `record_rate` packets per second (burst: one second's worth)."""
        # Observers may pass times slightly out of order: never refill backwards.
        elapsed = max(0.0, now - self._refilled)
        self._tokens = min(self.record_rate, self._tokens + elapsed * self.record_rate)
        self._refilled = max(self._refilled, now)
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def observe(self, packet: bytes, mark: int) -> bool:
        """Record one denied packet; False (and counted) when it is not recorded."""
        with self._lock:
            now = self.clock()
            if not self._admit(now):
                self.stats.not_recorded["rate_limited"] += 1
                return False
            try:
                key, length = packet_key(packet)
            except BadPacket as exc:
                self.stats.not_recorded["unparsable"] += 1
                self._log_once("unparsable", logging.WARNING, "denied packet not parsed: %s", exc)
                return False
            conn = self._connections.get(key)
            if conn is None:
                conn = self._new(key, mark, now)
                if conn is None:
                    return False
            conn.packets += 1
            conn.octets += length
            conn.stop_time = now
            conn.idle_expire = now + self.idle_timeout
            self.stats.recorded += 1
            return True

    def _new(self, key: FlowKey[bytes], mark: int, now: float) -> Connection | None:
        rule = self.rule(mark)
        if rule is None:
            self.stats.not_recorded["unknown_rule"] += 1
            self._log_once(
                ("rule", mark),
                logging.WARNING,
                "denied packet with rule id %d, which the inventory does not name",
                mark,
            )
            return None
        source, destination, proto, sport, dport = key
        # The connection as conntrack would have it, had it been committed.
        entry = Entry(
            proto=proto, orig_src=source, orig_dst=destination, orig_sport=sport,
            orig_dport=dport, reply_src=destination, reply_dst=source, reply_sport=dport,
            reply_dport=sport, zone=0, status=0, mark=0, labels=b"", orig_packets=0,
            orig_bytes=0, reply_packets=0, reply_bytes=0, start_ns=0, stop_ns=0, tcp_state=-1,
            id=0,
        )  # fmt: skip
        meta = self.enrich(entry)
        if meta is None:
            self.stats.not_recorded["no_local_pod"] += 1
            return None
        # The denying rule in its direction's place; no Service: the packet never got there.
        if rule.direction == "ingress":
            meta = dataclasses.replace(meta, ingress_rule=rule, cluster_ip="", service_port=0)
        else:
            meta = dataclasses.replace(meta, egress_rule=rule, cluster_ip="", service_port=0)
        conn = Connection(
            0,
            key,
            meta,
            0,
            0,
            0,
            0,
            -1,
            now,
            now,
            now + self.active_timeout,
            now + self.idle_timeout,
        )
        self._connections[key] = conn
        return conn

    def next_expiry(self) -> float | None:
        with self._lock:
            if not self._connections:
                return None
            return min(min(c.active_expire, c.idle_expire) for c in self._connections.values())

    def expire(self, now: float, drain: bool = False) -> list[Export]:
        """Due records; with `drain` (on shutdown), every connection with new packets."""
        out = []
        with self._lock:
            for key, conn in list(self._connections.items()):
                if drain and conn.exported[:2] != (conn.packets, conn.octets):
                    reason = END_OF_FLOW if conn.idle_expire <= now else END_ACTIVE
                elif conn.idle_expire <= now:
                    reason = END_OF_FLOW
                    del self._connections[key]
                elif conn.active_expire <= now:
                    reason = END_ACTIVE
                    conn.active_expire = now + self.active_timeout
                else:
                    continue
                packets, octets = conn.exported[:2]
                out.append(
                    Export(
                        conn,
                        reason,
                        conn.packets,
                        conn.octets,
                        0,
                        0,
                        conn.packets - packets,
                        conn.octets - octets,
                        0,
                        0,
                        conn.stop_time,
                    )
                )
                conn.exported = (conn.packets, conn.octets, 0, 0)
        return out
