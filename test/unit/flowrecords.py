"""Flow records shaped as the aggregator exports them, for the tests of what reads them (the
filters, `observe`'s formats): every element the readers look at, at its "absent" value,
and the two ends written as "ns/pod@node@ip", "ns/pod@ip" or a bare address."""

from __future__ import annotations

from typing import Any

BLANK: dict[str, Any] = {
    "protocolIdentifier": 6, "flowType": 2,
    "sourcePodName": "", "sourcePodNamespace": "", "sourceNodeName": "",
    "destinationPodName": "", "destinationPodNamespace": "", "destinationNodeName": "",
    "destinationServicePort": 0, "destinationServicePortName": "",
    "ingressNetworkPolicyName": "", "ingressNetworkPolicyNamespace": "",
    "ingressNetworkPolicyType": 0, "ingressNetworkPolicyRuleName": "",
    "ingressNetworkPolicyRuleAction": 0, "egressNetworkPolicyName": "",
    "egressNetworkPolicyNamespace": "", "egressNetworkPolicyType": 0,
    "egressNetworkPolicyRuleName": "", "egressNetworkPolicyRuleAction": 0,
}  # fmt: skip


def record(src: str, dst: str, **fields: Any) -> dict[str, Any]:
    """A record from `src` to `dst`, with `fields` over the blank ones. Without a Service the
    cluster IP is the unspecified address of the family, as agents send it."""
    out = dict(BLANK)
    family = "IPv6" if ":" in dst.rpartition("@")[2] else "IPv4"
    out[f"destinationCluster{family}"] = "::" if family == "IPv6" else "0.0.0.0"
    for side, text in (("source", src), ("destination", dst)):
        *pod, ip = text.split("@")
        out[f"{side}{'IPv6' if ':' in ip else 'IPv4'}Address"] = ip
        if pod:
            namespace, _, name = pod[0].partition("/")
            out.update({f"{side}PodNamespace": namespace, f"{side}PodName": name})
            if len(pod) > 1:
                out[f"{side}NodeName"] = pod[1]
    out.update(fields)
    return out
