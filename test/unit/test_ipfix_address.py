"""Antrea's `<HOST>:[<PORT>][:<PROTO>]` transport addresses."""

from __future__ import annotations

import pytest

from antrea_flow.ipfix.address import (
    IPFIX_PORT,
    PROTOCOLS,
    AddressError,
    TransportAddress,
    accepted_form,
    parse_address,
)


@pytest.mark.parametrize(
    "text,default,expected",
    [
        (
            "flow-aggregator.flow-aggregator.svc:4739:tls",
            "tcp",
            ("flow-aggregator.flow-aggregator.svc", 4739, "tls"),
        ),
        (
            "flow-aggregator.flow-aggregator.svc",
            "tls",
            ("flow-aggregator.flow-aggregator.svc", 4739, "tls"),
        ),
        ("10.96.0.10", "tls", ("10.96.0.10", 4739, "tls")),
        ("10.96.0.10:", "tcp", ("10.96.0.10", 4739, "tcp")),
        ("10.96.0.10:9995", "udp", ("10.96.0.10", 9995, "udp")),
        ("10.96.0.10::udp", "tls", ("10.96.0.10", 4739, "udp")),
        ("10.96.0.10:4739:tcp", "tls", ("10.96.0.10", 4739, "tcp")),
        ("10.96.0.10:1:udp", "tls", ("10.96.0.10", 1, "udp")),
        ("10.96.0.10:65535", "tls", ("10.96.0.10", 65535, "tls")),
        ("[fd00:10:96::a]:4739:tcp", "tls", ("fd00:10:96::a", 4739, "tcp")),
        ("[fd00:10:96::a]:4740", "tls", ("fd00:10:96::a", 4740, "tls")),
        ("[fd00:10:96::a]", "udp", ("fd00:10:96::a", 4739, "udp")),
        ("[fd00:10:96::a]:", "udp", ("fd00:10:96::a", 4739, "udp")),
        ("[fd00:10:96::a]::tcp", "udp", ("fd00:10:96::a", 4739, "tcp")),
        ("[::1]:4739", "tcp", ("::1", 4739, "tcp")),
        ("[::ffff:10.0.0.1]:4739", "tcp", ("::ffff:10.0.0.1", 4739, "tcp")),
        ("logstash:4739:UDP", "tcp", ("logstash", 4739, "udp")),
        ("logstash:4739:Tls", "tcp", ("logstash", 4739, "tls")),
        ("localhost", "tcp", ("localhost", 4739, "tcp")),
        (
            "ipfix-collector.ipfix.svc.cluster.local.:4739",
            "tcp",
            ("ipfix-collector.ipfix.svc.cluster.local.", 4739, "tcp"),
        ),
        ("my_collector-1:4739", "tcp", ("my_collector-1", 4739, "tcp")),
        ("  10.0.0.1:4739  ", "tcp", ("10.0.0.1", 4739, "tcp")),
    ],
)
def test_parse(text, default, expected):
    address = parse_address(text, default_protocol=default)
    assert (address.host, address.port, address.protocol) == expected
    assert isinstance(address, TransportAddress)


def test_defaults():
    assert IPFIX_PORT == 4739
    assert PROTOCOLS == ("tls", "tcp", "udp")
    assert parse_address("h", default_protocol="udp", default_port=2055) == TransportAddress(
        "h", 2055, "udp"
    )


def test_listen_allows_empty_host_and_port_zero():
    assert parse_address(":4739", default_protocol="tcp", listen=True) == TransportAddress(
        "", 4739, "tcp"
    )
    assert parse_address(":0:udp", default_protocol="tcp", listen=True) == TransportAddress(
        "", 0, "udp"
    )
    assert parse_address("", default_protocol="tls", listen=True) == TransportAddress(
        "", 4739, "tls"
    )
    assert parse_address("[::]:0", default_protocol="tcp", listen=True) == TransportAddress(
        "::", 0, "tcp"
    )
    assert parse_address("0.0.0.0:0", default_protocol="tcp", listen=True).port == 0


def test_restricted_protocols():
    address = parse_address("10.0.0.1:4739:udp", default_protocol="tcp", protocols=("tcp", "udp"))
    assert address.protocol == "udp"
    with pytest.raises(AddressError) as err:
        parse_address("10.0.0.1:4739:tls", default_protocol="tcp", protocols=("tcp", "udp"))
    assert "'tls'" in str(err.value)
    assert "tcp/udp" in str(err.value)


def test_port_required():
    address = parse_address("10.0.0.1:4739", default_protocol="tcp", port_required=True)
    assert address.port == 4739


@pytest.mark.parametrize(
    "address,text,host_port",
    [
        (TransportAddress("10.0.0.1", 4739, "tcp"), "10.0.0.1:4739:tcp", "10.0.0.1:4739"),
        (TransportAddress("fd00::1", 4739, "tls"), "[fd00::1]:4739:tls", "[fd00::1]:4739"),
        (TransportAddress("svc.ns", 1, "udp"), "svc.ns:1:udp", "svc.ns:1"),
    ],
)
def test_str_and_host_port(address, text, host_port):
    assert str(address) == text
    assert address.host_port == host_port
    assert parse_address(text, default_protocol="tcp") == address


# -- errors: each names the offending value and the accepted form ---------------------------------

ERRORS = [
    # (text, kwargs, what the message must name)
    ("fd00::1", {}, "fd00::1"),
    ("fd00::1:4739", {}, "fd00::1:4739"),
    ("2001:db8::1:4739:tcp", {}, "2001:db8::1:4739:tcp"),
    ("[10.0.0.1]:4739", {}, "10.0.0.1"),
    ("[fd00::1:4739", {}, "[fd00::1:4739"),
    ("[fd00::1]4739", {}, "[fd00::1]4739"),
    ("[fd00::1]:4739:tcp:x", {}, "[fd00::1]:4739:tcp:x"),
    ("10.0.0.1:http", {}, "'http'"),
    ("10.0.0.1:65536", {}, "'65536'"),
    ("10.0.0.1:-1", {}, "'-1'"),
    ("10.0.0.1: 4739", {}, "' 4739'"),
    ("10.0.0.1:0", {}, "port 0"),
    ("10.0.0.1:4739:sctp", {}, "'sctp'"),
    ("10.0.0.1:4739:", {}, "''"),
    ("10.0.0.1", {"port_required": True}, "missing port"),
    ("10.0.0.1::tcp", {"port_required": True}, "missing port"),
    (":4739", {}, "missing host"),
    ("", {}, "missing host"),
    ("[]:4739", {}, "''"),
    ("10.0.0.256:4739", {}, "'10.0.0.256'"),
    ("10.0.0:4739", {}, "'10.0.0'"),
    ("bad host:4739", {}, "'bad host'"),
    ("-leading-dash:4739", {}, "'-leading-dash'"),
    ("a..b:4739", {}, "'a..b'"),
]


@pytest.mark.parametrize("text,kwargs,names", ERRORS, ids=[repr(e[0]) for e in ERRORS])
def test_errors_name_value_and_accepted_form(text, kwargs, names):
    with pytest.raises(AddressError) as err:
        parse_address(text, default_protocol="tls", **kwargs)
    message = str(err.value)
    assert repr(text) in message
    assert names in message
    assert accepted_form(PROTOCOLS, kwargs.get("port_required", False)) in message
    assert "<HOST>:" in message


@pytest.mark.parametrize("text", ["fd00::1", "fe80::1", "2001:db8::1", "::1", "fd00::1:4739"])
def test_unbracketed_ipv6_reason_says_brackets(text):
    # The reason (before the accepted form) must point at the real mistake, not at a
    # "protocol '1'" or "missing host" read from the address's own colons.
    with pytest.raises(AddressError) as err:
        parse_address(text, default_protocol="tls")
    reason = str(err.value).split("; expected")[0]
    assert "bracket" in reason
    assert repr(text) in reason


@pytest.mark.parametrize("port", ["\u00b2", "47\u00b39"])
def test_non_ascii_digit_ports_are_address_errors(port):
    # str.isdigit() is true for superscript digits, which int() refuses: such a port must
    # still give an AddressError with the accepted form, not a bare int() ValueError.
    text = f"10.0.0.1:{port}"
    with pytest.raises(AddressError) as err:
        parse_address(text, default_protocol="tls")
    assert repr(port) in str(err.value)
    assert accepted_form(PROTOCOLS, False) in str(err.value)


def test_non_string_is_an_address_error():
    with pytest.raises(AddressError, match="not a string"):
        parse_address(4739, default_protocol="tls")  # type: ignore[arg-type]


def test_port_zero_only_when_listening():
    with pytest.raises(AddressError, match="port 0"):
        parse_address("10.0.0.1:0", default_protocol="tcp")
    assert parse_address("10.0.0.1:0", default_protocol="tcp", listen=True).port == 0


def test_accepted_form_text():
    assert accepted_form(("tcp", "udp"), True).startswith(
        "<HOST>:<PORT>[:<PROTO>] with PROTO one of tcp/udp"
    )
    assert accepted_form(PROTOCOLS, False).startswith("<HOST>:[<PORT>][:<PROTO>]")


def test_address_error_is_value_error():
    assert issubclass(AddressError, ValueError)
