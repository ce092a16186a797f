"""The flow filter of `antrea-flow observe` and the flow API: each parameter on records shaped
like the quickstart's exported ones, a parameter given twice (any of), different parameters
(all of), and a clear error naming the parameter and its accepted form for every bad value."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import flowrecords
import pytest

from antrea_flow.errors import UsageError
from antrea_flow.flowfilter import FILTER_PARAMETERS, FilterError, parse_filter, verdict

NOW = 1_796_676_700.0

# The times and ports of the quickstart's records.
_BASE = {
    "flowStartSeconds": 1_796_676_600, "flowEndSeconds": 1_796_676_600,
    "flowEndMilliseconds": 1_796_676_600_000,
    "sourceTransportPort": 40000, "destinationTransportPort": 8080,
}  # fmt: skip


def record(src: str, dst: str, **fields) -> dict:
    """A record from `src` to `dst` ("ns/pod@node@ip" for a Pod, "ip" for anything else)."""
    return flowrecords.record(src, dst, **{**_BASE, **fields})


CLIENT_1 = "frontend/client-1@node-1@10.10.1.2"
CLIENT_2 = "frontend/client-2@node-2@10.10.2.2"
WEB_1 = "backend/web-1@node-1@10.10.1.3"
DB = "backend/db@node-2@10.10.2.4"
ALLOW_FRONTEND = {"ingressNetworkPolicyName": "web-allow-frontend",
                  "ingressNetworkPolicyNamespace": "backend", "ingressNetworkPolicyType": 1,
                  "ingressNetworkPolicyRuleAction": 1}  # fmt: skip
WEB_SERVICE = {"destinationServicePortName": "backend/web:http", "destinationServicePort": 80}

RECORDS = {
    "external": record(CLIENT_1, "192.168.77.254", flowType=3, sourceTransportPort=59196),
    "intra": record(CLIENT_1, WEB_1, flowType=1, **ALLOW_FRONTEND),
    "service": record(CLIENT_2, WEB_1, destinationClusterIPv4="10.96.0.10",
                      **WEB_SERVICE, **ALLOW_FRONTEND),
    "dropped": record(DB, WEB_1, ingressNetworkPolicyType=1, ingressNetworkPolicyRuleAction=2),
    "rejected": record(CLIENT_1, DB, ingressNetworkPolicyName="acnp-db-guard",
                       ingressNetworkPolicyType=3, ingressNetworkPolicyRuleName="reject-clients",
                       ingressNetworkPolicyRuleAction=3),
    "acnp": record(WEB_1, DB, ingressNetworkPolicyName="acnp-db-guard",
                   ingressNetworkPolicyType=3, ingressNetworkPolicyRuleName="allow-web",
                   ingressNetworkPolicyRuleAction=1),
    "udp": record(CLIENT_1, CLIENT_2, protocolIdentifier=17, sourceTransportPort=55206,
                  destinationTransportPort=5201),
    "egress": record(CLIENT_2, "93.184.216.34", flowType=3, destinationTransportPort=443,
                     egressNetworkPolicyName="lockdown", egressNetworkPolicyNamespace="frontend",
                     egressNetworkPolicyType=1, egressNetworkPolicyRuleAction=2),
    "v6service": record("frontend/client-1@node-1@fd00:10:10:1::2",
                        "backend/web-2@node-2@fd00:10:10:2::3",
                        destinationClusterIPv6="fd00:10:96::a", **WEB_SERVICE, **ALLOW_FRONTEND),
    "icmp6": record("fe80::64b9:10ff:fe76:5a6b", "frontend/client-2@node-2@fd00:10:10:2::2",
                    protocolIdentifier=58, flowType=4, sourceTransportPort=0,
                    destinationTransportPort=34560),
    "staging": record("staging/web-canary@node-3@10.10.3.9", DB),
}  # fmt: skip


def pick(now: float = NOW, records: dict[str, dict] = RECORDS, **params: str | list[str]) -> set:
    """The names of the records the filter of `params` (underscores for dashes) takes."""
    parsed = {
        name.replace("_", "-"): [value] if isinstance(value, str) else value
        for name, value in params.items()
    }
    flow_filter = parse_filter(parsed, now)
    return {name for name, r in records.items() if flow_filter.matches(r)}


def test_the_empty_filter_takes_every_record():
    assert pick() == set(RECORDS)
    assert pick(pod=[""], verdict="") == set(RECORDS)  # empty values are no filter


def test_pod_by_name_prefix_in_any_namespace_on_either_side():
    assert pick(pod="web-1") == {"intra", "service", "dropped", "acnp"}
    assert pick(pod="web") == {"intra", "service", "dropped", "acnp", "v6service", "staging"}
    assert pick(pod="client-2") == {"service", "udp", "egress", "icmp6"}


def test_pod_with_namespace():
    assert pick(pod="backend/web") == {"intra", "service", "dropped", "acnp", "v6service"}
    assert pick(pod="staging/web") == {"staging"}
    assert pick(pod="frontend/web") == set()
    # a namespace and no name: every Pod of it
    assert pick(pod="staging/") == {"staging"}


def test_pod_and_namespace_together_mean_namespace_slash_pod():
    # "staging" has a Pod named web-canary and a Pod in backend (db): separately each
    # parameter matches it, but together they ask for backend/web*.
    assert pick(pod="web") >= {"staging"}
    assert "staging" in pick(namespace="backend")
    assert pick(pod="web", namespace="backend") == {
        "intra", "service", "dropped", "acnp", "v6service",
    }  # fmt: skip
    # a namespace written in the value wins over the parameter
    assert pick(pod="staging/web", namespace="backend") == {"staging"}


def test_from_pod_and_to_pod_look_at_one_side():
    assert pick(from_pod="client-1") == {"external", "intra", "rejected", "udp", "v6service"}
    assert pick(to_pod="client") == {"udp", "icmp6"}
    assert pick(from_pod="backend/db") == {"dropped"}
    assert pick(to_pod="backend/db") == {"rejected", "acnp", "staging"}


def test_from_pod_and_to_pod_take_their_own_namespace_then_the_common_one():
    assert pick(from_pod="web", from_namespace="staging") == {"staging"}
    assert pick(from_pod="web", namespace="backend") == {"acnp"}
    assert pick(to_pod="web", to_namespace="backend") == {
        "intra", "service", "dropped", "v6service",
    }  # fmt: skip


def test_namespace_on_either_side_and_from_and_to_namespace_on_one():
    assert pick(namespace="staging") == {"staging"}
    assert pick(namespace="frontend") == set(RECORDS) - {"dropped", "acnp", "staging"}
    assert pick(from_namespace="backend") == {"dropped", "acnp"}
    assert pick(to_namespace="frontend") == {"udp", "icmp6"}


def test_service_by_namespace_and_name():
    both = {"service", "v6service"}
    assert pick(service="backend/web") == both
    assert pick(service="web") == both
    assert pick(service="frontend/web") == set()
    assert pick(service="we") == set()  # a name, not a prefix


def test_service_by_name_and_port_name():
    both = {"service", "v6service"}
    assert pick(service="web:http") == both
    assert pick(service="backend/web:http") == both
    assert pick(service="web:https") == set()


def test_node_on_either_side():
    assert pick(node="node-3") == {"staging"}
    assert pick(node="node-2") == {
        "service", "dropped", "rejected", "acnp", "udp", "egress", "v6service", "icmp6",
        "staging",
    }  # fmt: skip


def test_ip_address_and_cidr_on_either_side():
    assert pick(ip="10.10.1.3") == {"intra", "service", "dropped", "acnp"}
    assert pick(ip="10.10.2.0/24") == {
        "service", "dropped", "rejected", "acnp", "udp", "egress", "staging",
    }  # fmt: skip
    assert pick(ip="10.10.2.0/255.255.255.0") == pick(ip="10.10.2.0/24")
    assert pick(ip="10.10.2.9/24") == pick(ip="10.10.2.0/24")  # host bits are ignored


def test_ipv6_addresses_and_cidrs():
    assert pick(ip="fd00:10:10:2::/64") == {"v6service", "icmp6"}
    assert pick(from_ip="fe80::/10") == {"icmp6"}
    assert pick(to_ip="fd00:10:10:2::3") == {"v6service"}
    assert pick(ip="::/0") == {"v6service", "icmp6"}  # no IPv4 record is in an IPv6 network
    assert pick(ip="0.0.0.0/0") == set(RECORDS) - {"v6service", "icmp6"}


def test_from_ip_and_to_ip_look_at_one_side():
    assert pick(from_ip="10.10.1.2") == {"external", "intra", "rejected", "udp"}
    assert pick(to_ip="10.10.1.2") == set()
    assert pick(to_ip="93.184.216.0/24") == {"egress"}


def test_to_ip_matches_the_service_cluster_ip_dialled():
    assert pick(to_ip="10.96.0.10") == {"service"}
    assert pick(ip="10.96.0.0/12") == {"service"}
    assert pick(to_ip="fd00:10:96::a") == {"v6service"}
    assert pick(from_ip="10.96.0.10") == set()
    # the exporter's "no cluster IP" is not an address anyone dialled
    assert pick(to_ip="0.0.0.0") == set()
    assert pick(to_ip="::") == set()


def test_port_on_either_side():
    assert pick(port="59196") == {"external"}
    assert pick(port="5201") == {"udp"}
    assert pick(port="443") == {"egress"}


def test_from_port_and_to_port():
    assert pick(from_port="55206") == {"udp"}
    assert pick(from_port="5201") == set()
    assert pick(to_port="5201") == {"udp"}
    assert pick(to_port="55206") == set()


def test_to_port_and_port_match_the_service_port_dialled():
    assert pick(to_port="80") == {"service", "v6service"}
    assert pick(port="80") == {"service", "v6service"}
    assert pick(from_port="80") == set()
    # a record without a Service says port 0 for it: that is no port dialled
    assert pick(to_port="0") == set()


def test_protocol_by_name_and_number():
    assert pick(protocol="udp") == {"udp"}
    assert pick(protocol="UDP") == {"udp"}
    assert pick(protocol="17") == {"udp"}
    assert pick(protocol="icmpv6") == {"icmp6"}
    assert pick(protocol="ipv6-icmp") == {"icmp6"}
    assert pick(protocol="58") == {"icmp6"}
    assert pick(protocol="tcp") == set(RECORDS) - {"udp", "icmp6"}
    assert pick(protocol="sctp") == set()
    assert pick(protocol="icmp") == set()


def test_verdict_allowed_dropped_rejected():
    assert pick(verdict="DROPPED") == {"dropped", "egress"}
    assert pick(verdict="REJECTED") == {"rejected"}
    assert pick(verdict="ALLOWED") == set(RECORDS) - {"dropped", "egress", "rejected"}


def test_verdict_is_case_insensitive_and_forwarded_means_allowed():
    assert pick(verdict="dropped") == pick(verdict="DROPPED")
    assert pick(verdict="Rejected") == {"rejected"}
    assert pick(verdict="forwarded") == pick(verdict="ALLOWED")
    assert pick(verdict="FORWARDED") == pick(verdict="ALLOWED")


@pytest.mark.parametrize(
    ("ingress", "egress", "expected"),
    [(0, 0, "ALLOWED"), (1, 1, "ALLOWED"), (2, 0, "DROPPED"), (0, 2, "DROPPED"),
     (3, 0, "REJECTED"), (0, 3, "REJECTED"), (3, 2, "DROPPED"), (2, 3, "DROPPED")],
)  # fmt: skip
def test_verdict_of_either_sides_rule_action(ingress, egress, expected):
    r = {"ingressNetworkPolicyRuleAction": ingress, "egressNetworkPolicyRuleAction": egress}
    assert verdict(r) == expected


def test_policy_by_namespace_and_name_on_ingress_or_egress():
    allow = {"intra", "service", "v6service"}
    assert pick(policy="backend/web-allow-frontend") == allow
    assert pick(policy="web-allow-frontend") == allow
    assert pick(policy="frontend/web-allow-frontend") == set()
    assert pick(policy="frontend/lockdown") == {"egress"}  # an egress rule's
    assert pick(policy="acnp-db-guard") == {"rejected", "acnp"}  # cluster-wide: no namespace
    assert pick(policy="web-allow") == set()  # a name, not a prefix


def test_type():
    assert pick(type="intra-node") == {"intra"}
    assert pick(type="to-external") == {"external", "egress"}
    assert pick(type="from-external") == {"icmp6"}
    assert pick(type="Inter-Node") == set(RECORDS) - {"intra", "external", "egress", "icmp6"}


def _ago(*seconds: float) -> set[str]:
    return {f"{s:g}s ago" for s in seconds}


# Records that ended this long before NOW.
TIMED = {
    f"{ago:g}s ago": {"flowEndSeconds": int(NOW - ago), "flowEndMilliseconds": (NOW - ago) * 1000}
    for ago in (3600, 300.5, 299.5, 60, 5)
}


def test_since_and_until_with_durations_ago():
    assert pick(records=TIMED, since="5m") == _ago(299.5, 60, 5)
    assert pick(records=TIMED, until="1m") == _ago(3600, 300.5, 299.5, 60)
    assert pick(records=TIMED, since="1h30m", until="2m") == _ago(3600, 300.5, 299.5)


def test_since_and_until_with_iso_times_utc_unless_they_say():
    def iso(seconds: float, **kwargs) -> str:
        return datetime.fromtimestamp(seconds, UTC).isoformat(**kwargs)

    expected = _ago(60, 5)
    assert pick(records=TIMED, since=iso(NOW - 100)) == expected
    assert pick(records=TIMED, since=iso(NOW - 100).replace("+00:00", "Z")) == expected
    naive = datetime.fromtimestamp(NOW - 100, UTC).replace(tzinfo=None).isoformat()
    assert pick(records=TIMED, since=naive) == expected
    # the same moment written in another zone
    plus_two = datetime.fromtimestamp(NOW - 100, timezone(timedelta(hours=2))).isoformat()
    assert plus_two.endswith("+02:00")
    assert pick(records=TIMED, since=plus_two) == expected
    assert pick(records=TIMED, until=iso(NOW - 3000)) == _ago(3600)


def test_since_and_until_with_epoch_seconds():
    assert pick(records=TIMED, since=str(int(NOW - 100))) == _ago(60, 5)
    assert pick(records=TIMED, until=f"{NOW - 300:.1f}") == _ago(3600, 300.5)


def test_since_uses_milliseconds_and_falls_back_to_seconds():
    records = {
        "ms": {"flowEndSeconds": int(NOW - 10), "flowEndMilliseconds": (NOW - 9.5) * 1000},
        "seconds only": {"flowEndSeconds": int(NOW - 10)},
    }
    assert pick(records=records, since=str(NOW - 9.8)) == {"ms"}
    assert pick(records=records, since=str(NOW - 10)) == {"ms", "seconds only"}


def test_several_since_or_until_take_the_widest_window():
    assert pick(records=TIMED, since=["1m", "5m"]) == _ago(299.5, 60, 5)
    assert pick(records=TIMED, until=["59m", "1m"]) == _ago(3600, 300.5, 299.5, 60)


def test_the_same_parameter_twice_matches_either_value():
    assert pick(verdict=["DROPPED", "REJECTED"]) == {"dropped", "egress", "rejected"}
    assert pick(protocol=["udp", "icmpv6"]) == {"udp", "icmp6"}
    assert pick(to_pod=["backend/db", "frontend/client"]) == {
        "rejected", "acnp", "staging", "udp", "icmp6",
    }  # fmt: skip
    assert pick(ip=["10.96.0.10", "fe80::/10"]) == {"service", "icmp6"}
    assert pick(type=["intra-node", "from-external"]) == {"intra", "icmp6"}
    assert pick(namespace=["staging", "nowhere"]) == {"staging"}


def test_different_parameters_must_all_match():
    assert pick(from_pod="client-1", verdict="REJECTED") == {"rejected"}
    assert pick(from_pod="client-1", verdict="DROPPED") == set()
    assert pick(node="node-2", protocol="udp") == {"udp"}
    assert pick(to_port="8080", type="inter-node", verdict="ALLOWED") == {
        "service", "acnp", "v6service", "staging",
    }  # fmt: skip
    assert pick(service="web", ip="fd00::/8") == {"v6service"}


BAD_VALUES = [
    ("pod", "a/b/c"), ("pod", "/web"), ("pod", "web pod"), ("pod", " "),
    ("from-pod", "a/b/c"), ("to-pod", "ns/x/y"),
    ("namespace", "a/b"), ("namespace", "two words"),
    ("from-namespace", "a/b"), ("to-namespace", "x y"),
    ("service", "a/b/c"), ("service", "backend/"), ("service", "/web"),
    ("node", "node/1"),
    ("ip", "10.0.0.300"), ("ip", "10.0.0.0/33"), ("ip", "web"),
    ("from-ip", "fd00::g"), ("to-ip", "1.2.3"),
    ("port", "70000"), ("port", "-1"), ("port", "http"), ("port", "8.0"), ("port", "1_000"),
    ("port", "\u0663"),  # an Arabic-Indic three: int() takes it
    ("from-port", "65536"), ("to-port", "x"),
    ("protocol", "foo"), ("protocol", "256"), ("protocol", "-1"),
    ("verdict", "foo"), ("verdict", "PASSED"),
    ("policy", "a/b/c"), ("policy", "ns/"),
    ("type", "sideways"),
    ("since", "yesterday"), ("since", "nan"), ("since", "inf"), ("since", "5 minutes"),
    ("since", "-5m"),  # a time to come
    ("until", "tomorrow"), ("until", "2026-13-01T00:00:00Z"),
]  # fmt: skip


@pytest.mark.parametrize(("parameter", "value"), BAD_VALUES)
def test_a_bad_value_names_the_parameter_and_the_accepted_form(parameter, value):
    with pytest.raises(FilterError) as caught:
        parse_filter({"verdict": ["ALLOWED"], parameter: [value]}, NOW)
    error = caught.value
    assert (error.parameter, error.value, error.form) == (
        parameter,
        value,
        FILTER_PARAMETERS[parameter],
    )
    assert (
        str(error)
        == f"{parameter}: {value!r} is not valid; expected {FILTER_PARAMETERS[parameter]}"
    )
    assert isinstance(error, UsageError)  # the CLI prints it in one line, exit code 2


def test_a_bad_value_after_good_ones_of_the_same_parameter_is_named():
    with pytest.raises(FilterError) as caught:
        parse_filter({"port": ["80", "443", "99999"]}, NOW)
    assert caught.value.value == "99999"


def test_every_accepted_form_is_quoted_in_its_errors():
    assert set(FILTER_PARAMETERS) == {
        "pod", "from-pod", "to-pod", "namespace", "from-namespace", "to-namespace", "service",
        "node", "ip", "from-ip", "to-ip", "port", "from-port", "to-port", "protocol", "verdict",
        "policy", "type", "since", "until",
    }  # fmt: skip
    assert {p for p, _ in BAD_VALUES} == set(FILTER_PARAMETERS)
