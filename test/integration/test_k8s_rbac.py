"""The RBAC rules of build/yamls/ against what the code asks of the API server: every
request the agent and the aggregator make (watching, the certificate hand-off including a
rotation) is allowed by their ServiceAccount's rules, and every rule is used by one."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path
from typing import Any

import yaml

from antrea_flow.k8s.client import api_connection
from antrea_flow.k8s.credentials import ClusterCertificates, fetch_client_credentials
from antrea_flow.k8s.stores import MetadataStore
from antrea_flow.k8s.watch import AGGREGATOR_RESOURCES, ApiSource, agent_resources

from .fakeapi import FakeApiServer, Request
from .test_k8s_watch import CLUSTER, policy

ROOT = Path(__file__).resolve().parents[2]
AGGREGATOR = "system:serviceaccount:flow-aggregator:flow-aggregator"
AGENT = "system:serviceaccount:kube-system:antrea-flow-agent"


def manifests() -> list[dict[str, Any]]:
    objects = []
    for name in ("flow-aggregator.yml", "antrea-flow-agent.yml"):
        objects += [d for d in yaml.safe_load_all((ROOT / "build" / "yamls" / name).read_text())]
    return [o for o in objects if o]


def grants(objects: list[dict[str, Any]], user: str) -> list[tuple[str | None, dict[str, Any]]]:
    """(namespace the rule applies in, or None for the cluster; rule) of a ServiceAccount."""
    _, _, namespace, name = user.split(":")
    roles = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
             for o in objects if o["kind"] in ("Role", "ClusterRole")}  # fmt: skip
    out = []
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s["kind"] == "ServiceAccount" and s["name"] == name
                   and s["namespace"] == namespace for s in binding["subjects"]):  # fmt: skip
            continue
        scope = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        role = roles[(ref["kind"], scope if ref["kind"] == "Role" else None, ref["name"])]
        out += [(scope, rule) for rule in role["rules"]]
    return out


def allows(scope: str | None, rule: dict[str, Any], request: Request) -> bool:
    plural, _, group = request.resource.partition(".")
    if scope is not None and request.namespace != scope:
        return False
    names = rule.get("resourceNames")
    # As the API server decides: a create has no name to match, a named rule never allows it.
    if names and (request.verb == "create" or request.name not in names):
        return False
    return (group in rule["apiGroups"] and plural in rule["resources"]
            and request.verb in rule["verbs"])  # fmt: skip


def uses(scope: str | None, rule: dict[str, Any]) -> set[tuple]:
    """Every (verb, resource, name) the rule grants, one by one."""
    group = rule["apiGroups"][0]
    return {
        (verb, f"{resource}.{group}" if group else resource, name, scope)
        for verb in rule["verbs"]
        for resource in rule["resources"]
        for name in rule.get("resourceNames") or [None]
    }


def test_every_call_is_allowed_and_every_rule_is_used(tmp_path):
    with FakeApiServer() as api:
        api.tokens = {"aggregator-token": AGGREGATOR, "agent-token": AGENT}
        api.put_all(CLUSTER)
        api.put(policy("anp", 501, "crd.antrea.io/v1beta1", "NetworkPolicy"))
        aggregator = api_connection(str(api.kubeconfig(tmp_path / "a", "aggregator-token")))
        agent = api_connection(str(api.kubeconfig(tmp_path / "b", "agent-token")))
        assert aggregator is not None and agent is not None

        async def watch_all() -> None:
            sources = [ApiSource(aggregator, AGGREGATOR_RESOURCES, MetadataStore()),
                       ApiSource(agent, agent_resources("node-1"), MetadataStore())]  # fmt: skip
            for source in sources:
                source.start()
            try:
                for source in sources:
                    assert await source.wait_synced(15)
                while api.watch_count < 9:  # every resource watched
                    await asyncio.sleep(0.02)
            finally:
                for source in sources:
                    await source.stop()

        asyncio.run(watch_all())
        # The hand-off: created, then rotated (updates of all three objects), then fetched.
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=300)
        ClusterCertificates(aggregator, "flow-aggregator", now=lambda: past).sync()
        ClusterCertificates(aggregator, "flow-aggregator").sync()
        fetch_client_credentials(agent, "flow-aggregator")
        requests = api.requests_of()

    objects = manifests()
    used: set[tuple] = set()
    for user in (AGGREGATOR, AGENT):
        rules = grants(objects, user)
        mine = [r for r in requests if r.user == user]
        assert mine, user
        for request in mine:
            matching = [(scope, rule) for scope, rule in rules if allows(scope, rule, request)]
            assert matching, f"{user} may not {request.verb} {request.resource} {request.name!r}"
            for scope, rule in matching:
                used |= {u for u in uses(scope, rule)
                         if u[0] == request.verb and u[1] == request.resource
                         and u[2] in (None, request.name)}  # fmt: skip
        granted = set().union(*(uses(scope, rule) for scope, rule in rules))
        unused = granted - used
        assert not unused, f"{user}: rules no request needs: {sorted(unused, key=str)}"
