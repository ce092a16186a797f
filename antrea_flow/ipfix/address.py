"""Transport addresses in Antrea's `<HOST>:[<PORT>][:<PROTO>]` form."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

IPFIX_PORT = 4739
PROTOCOLS = ("tls", "tcp", "udp")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$"
)


class AddressError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class TransportAddress:
    host: str  # IP literal (without brackets) or DNS name; "" means all local addresses
    port: int
    protocol: str

    def __str__(self) -> str:
        return f"{self.host_port}:{self.protocol}"

    @property
    def host_port(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def accepted_form(protocols: tuple[str, ...], port_required: bool) -> str:
    port = "<PORT>" if port_required else "[<PORT>]"
    return (
        f"<HOST>:{port}[:<PROTO>] with PROTO one of {'/'.join(protocols)} "
        "and IPv6 hosts in brackets, e.g. 10.0.0.1:4739:tcp or [fd00::1]:4739"
    )


def parse_address(
    text: str,
    *,
    default_protocol: str,
    default_port: int = IPFIX_PORT,
    protocols: tuple[str, ...] = PROTOCOLS,
    port_required: bool = False,
    listen: bool = False,
) -> TransportAddress:
    """Parse `text`; AddressError names what is wrong and the accepted form.

    `listen` addresses may leave the host empty (all local addresses) and use port 0
    (any free port).
    """

    def fail(reason: str) -> AddressError:
        form = accepted_form(protocols, port_required)
        return AddressError(f"invalid address {text!r}: {reason}; expected {form}")

    if not isinstance(text, str):
        raise fail("not a string")
    rest = text.strip()
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise fail("unclosed '['")
        host = rest[1:close]
        rest = rest[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise fail(f"{host!r} in brackets is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise fail("expected ':' after ']'")
        parts = rest[1:].split(":") if rest else []
    else:
        if rest.count(":") > 2 or (":" in rest and is_ip(rest)):
            raise fail("IPv6 addresses go in brackets, e.g. [fd00::1]:4739")
        host, *parts = rest.split(":")
        if len(parts) > 2:
            raise fail("too many ':' (IPv6 addresses go in brackets)")
        if host and not _valid_host(host):
            raise fail(f"{host!r} is not an IP address or DNS name")
    if not host and not listen:
        raise fail("missing host")
    if len(parts) > 2:
        raise fail("too many ':'")
    port_text = parts[0] if parts else ""
    protocol = parts[1].lower() if len(parts) > 1 else default_protocol
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
            raise fail(f"port {port_text!r} is not a number in 0..65535")
        port = int(port_text)
        if port == 0 and not listen:
            raise fail("port 0 is only for listening")
    elif port_required:
        raise fail("missing port")
    else:
        port = default_port
    if protocol not in protocols:
        raise fail(f"protocol {protocol!r} is not one of {'/'.join(protocols)}")
    return TransportAddress(host, port, protocol)


def is_ip(text: str) -> bool:
    """True for an IPv4 or IPv6 literal (without brackets)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _valid_host(host: str) -> bool:
    if is_ip(host):
        return ":" not in host  # an IPv6 literal needs brackets here
    if host.replace(".", "").isdigit():
        return False  # looks like a broken IPv4 literal, not a name
    return bool(_HOSTNAME.match(host))
