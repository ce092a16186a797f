"""Decoded records as JSON objects and as one-line text, for collectors and sinks."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from .collecting import Peer
from .messages import Message


def json_value(value: Any) -> Any:
    """Bytes become hex strings; everything else a record holds is JSON already."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return value


def exporter_key(address: str) -> str:
    """The IANA element naming an exporter address of this family."""
    version = ipaddress.ip_address(address.split("%")[0]).version
    return "exporterIPv4Address" if version == 4 else "exporterIPv6Address"


def message_records(peer: Peer, message: Message) -> list[dict[str, Any]]:
    """Every data record of `message` with the exporter address, observation domain and
    template id added under their IANA names (a record's own fields take precedence)."""
    address = peer.address
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        address = str(ip.ipv4_mapped)
    meta_key = exporter_key(address)
    out = []
    for data_set in message.data_sets:
        meta = {
            meta_key: address,
            "observationDomainId": message.observation_domain_id,
            "templateId": data_set.template.template_id,
        }
        for record in data_set.records:
            row = dict(meta)
            row.update(record)
            out.append(row)
    return out


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, default=json_value, separators=(",", ":"))


def text_line(record: dict[str, Any]) -> str:
    return " ".join(f"{key}={_text_value(value)}" for key, value in record.items())


def _text_value(value: Any) -> Any:
    value = json_value(value)
    if isinstance(value, str) and not value.isprintable():
        return json.dumps(value)  # escapes line breaks and other control characters
    return value
