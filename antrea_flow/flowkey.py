"""The 5-tuple that identifies a flow, in the agent (packed addresses, as conntrack gives
them) and in the aggregator (address strings, as IPFIX decodes them)."""

from __future__ import annotations

from typing import Generic, NamedTuple, TypeVar

Address = TypeVar("Address", bytes, str, str | None)


class FlowKey(NamedTuple, Generic[Address]):
    """Source, destination, protocol and ports; after DNAT (the Service's endpoint), as
    Antrea keys its flows. ICMP has type * 256 + code as the destination port. Addresses
    are packed (the agent) or strings (the aggregator: None when a record has none)."""

    source: Address
    destination: Address
    protocol: int
    source_port: int
    destination_port: int


# Built per record on hot paths: without NamedTuple's keyword-handling constructor.
make_key = tuple.__new__
