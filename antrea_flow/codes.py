"""The codes flow records and configuration use, in one place: flow types, NetworkPolicy
types, rule actions and flow end reasons as Antrea's IPFIX elements encode them, and the
defaults every component names (Antrea's conntrack zone, the aggregator's Service name)."""

from __future__ import annotations

# flowType (Antrea PEN 56506, element 137).
FLOW_TYPE_INTRA_NODE = 1
FLOW_TYPE_INTER_NODE = 2
FLOW_TYPE_TO_EXTERNAL = 3
FLOW_TYPE_FROM_EXTERNAL = 4

# ingressNetworkPolicyType / egressNetworkPolicyType.
POLICY_TYPE_K8S = 1
POLICY_TYPE_ANP = 2  # Antrea NetworkPolicy
POLICY_TYPE_ACNP = 3  # Antrea ClusterNetworkPolicy

# ingressNetworkPolicyRuleAction / egressNetworkPolicyRuleAction.
ACTION_NONE = 0  # Antrea's Pass (and anything else): no action of this rule's own
ACTION_ALLOW = 1
ACTION_DROP = 2
ACTION_REJECT = 3
ACTION_NAMES = {ACTION_NONE: "none", ACTION_ALLOW: "allow", ACTION_DROP: "drop",
                ACTION_REJECT: "reject"}  # fmt: skip

# flowEndReason (IANA element 136).
END_IDLE = 1
END_ACTIVE = 2
END_OF_FLOW = 3
END_REASON_NAMES = {END_IDLE: "idle_timeout", END_ACTIVE: "active_timeout",
                    END_OF_FLOW: "end_of_flow"}  # fmt: skip

# Antrea's conntrack zone of Pod traffic (CtZone 0xfff0).
ANTREA_POD_ZONE = 65520
# The flow aggregator's Service as Antrea names it: what agents dial, and the name they
# check in its certificate when they dial an IP.
AGGREGATOR_SERVICE_NAME = "flow-aggregator.flow-aggregator.svc"
