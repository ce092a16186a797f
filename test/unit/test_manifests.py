"""The Kubernetes manifests of build/yamls/ and the images: generated from one source,
valid against the Kubernetes OpenAPI schemas (offline), named as upstream names them, with
configs the product's own loaders accept, and Dockerfiles whose parts exist."""

from __future__ import annotations

import configparser
import copy
import importlib.util
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from antrea_flow.aggregator.config import CLICKHOUSE_CA, load_aggregator_config
from antrea_flow.cli import parser
from antrea_flow.exporter.config import load_agent_config

ROOT = Path(__file__).resolve().parents[2]
YAMLS = ROOT / "build" / "yamls"
KUBERNETES = "1.30"  # the oldest version the manifests promise (schemas of later ones too)


def generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "build" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((YAMLS / name).read_text()) if d]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind} {name}: {len(matches)} found"
    return matches[0]


MANIFESTS = ("flow-aggregator.yml", "antrea-flow-agent.yml", "antrea-config-flow-exporter.yml")


@pytest.mark.parametrize("name", MANIFESTS)
def test_the_committed_manifests_are_what_the_generator_writes(name, tmp_path):
    generator().write(tmp_path)
    assert (tmp_path / name).read_text() == (YAMLS / name).read_text(), (
        f"build/yamls/{name} is stale: run `make manifests`"
    )


@pytest.mark.parametrize("name", MANIFESTS)
@pytest.mark.parametrize("version", [KUBERNETES, "1.37"])
def test_every_document_validates_against_the_kubernetes_schemas(name, version):
    for document in documents(name):
        kubernetes_validate.validate(document, version, strict=True)


def test_the_validation_would_catch_a_misspelled_field():
    deployment = find(documents("flow-aggregator.yml"), "Deployment", "flow-aggregator")
    broken = copy.deepcopy(deployment)
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_the_aggregator_objects_carry_upstreams_names():
    objects = documents("flow-aggregator.yml")
    expected = {
        ("Namespace", "flow-aggregator", None),
        ("ServiceAccount", "flow-aggregator", "flow-aggregator"),
        ("ConfigMap", "flow-aggregator-configmap", "flow-aggregator"),
        ("ClusterRole", "flow-aggregator-role", None),
        ("ClusterRoleBinding", "flow-aggregator-cluster-role-binding", None),
        ("Role", "flow-aggregator-role", "flow-aggregator"),
        ("RoleBinding", "flow-aggregator-role-binding", "flow-aggregator"),
        ("Role", "flow-aggregator-exporter-role", "flow-aggregator"),
        ("RoleBinding", "flow-aggregator-exporter-role-binding", "flow-aggregator"),
        ("Service", "flow-aggregator", "flow-aggregator"),
        ("Deployment", "flow-aggregator", "flow-aggregator"),
        ("NetworkPolicy", "flow-aggregator", "flow-aggregator"),
    }
    found = {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in objects}
    assert found == expected
    assert all(o["metadata"]["labels"]["app"] == "flow-aggregator" for o in objects)
    service = find(objects, "Service", "flow-aggregator")
    ports = {(p["name"], p["port"], p["protocol"]) for p in service["spec"]["ports"]}
    assert {("ipfix-udp", 4739, "UDP"), ("ipfix-tcp", 4739, "TCP")} <= ports
    binding = find(objects, "RoleBinding", "flow-aggregator-exporter-role-binding")
    subjects = {(s["namespace"], s["name"]) for s in binding["subjects"]}
    assert ("kube-system", "antrea-agent") in subjects  # Antrea's agents keep working
    assert ("kube-system", "antrea-flow-agent") in subjects


def test_the_aggregator_deployment_is_locked_down_and_probed(tmp_path):
    objects = documents("flow-aggregator.yml")
    pod = find(objects, "Deployment", "flow-aggregator")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "antrea-flow/flow-aggregator:latest"
    assert container["args"] == ["--config", "/etc/flow-aggregator/flow-aggregator.conf"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "subPath" not in mounts["/etc/flow-aggregator"]  # an edited ConfigMap arrives
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert container["resources"]["requests"]
    env = {e["name"]: e["valueFrom"] for e in container["env"]}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # A ClickHouse server's user and CA, as upstream names their Secrets; optional, so the
    # Pod starts without them.
    for name, key in (("CH_USERNAME", "username"), ("CH_PASSWORD", "password")):
        assert env[name]["secretKeyRef"] == {
            "name": "clickhouse-secret", "key": key, "optional": True
        }  # fmt: skip
    volumes = {v["name"]: v for v in pod["volumes"]}
    ca = next(m for m in mounts.values() if m["name"] == "clickhouse-ca")
    assert Path(CLICKHOUSE_CA).parent == Path(ca["mountPath"])
    assert volumes["clickhouse-ca"]["secret"] == {"secretName": "clickhouse-ca", "optional": True}
    # Every directory the aggregator writes is a volume (the root filesystem is read-only),
    # an embedded ClickHouse's too.
    config = aggregator_config(objects, tmp_path)
    assert config.cert_dir.startswith("/var/run/antrea-flow") and "/var/run/antrea-flow" in mounts
    policy = find(objects, "NetworkPolicy", "flow-aggregator")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    allowed = {(p["protocol"], p["port"]) for rule in policy["ingress"] for p in rule["ports"]}
    assert allowed == {("TCP", 4739), ("UDP", 4739), ("TCP", 10348)}
    assert config.metrics_address is not None and config.metrics_address.port == 10348


def aggregator_config(objects: list[dict[str, Any]], directory: Path):
    text = find(objects, "ConfigMap", "flow-aggregator-configmap")["data"]["flow-aggregator.conf"]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "flow-aggregator.conf"
    path.write_text(text)
    return load_aggregator_config(path)


@pytest.fixture
def in_a_pod(monkeypatch):
    """The agent's default config is for a Pod: the API gives its certificates."""
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")


def test_the_embedded_configs_load_with_the_products_loaders_at_the_defaults(tmp_path, in_a_pod):
    config = aggregator_config(documents("flow-aggregator.yml"), tmp_path)
    assert config.tls and config.listen.port == 4739 and config.export_interval == 60.0
    text = documents("antrea-config-flow-exporter.yml")[0]["data"]["antrea-agent.conf"]
    assert text == (ROOT / "exporter" / "antrea-agent.conf").read_text()
    (tmp_path / "antrea-agent.conf").write_text(text)
    agent = load_agent_config(tmp_path / "antrea-agent.conf")
    assert agent.flow_exporter_enabled
    assert str(agent.collector) == "flow-aggregator.flow-aggregator.svc:4739:tls"
    assert (agent.poll_interval, agent.active_timeout, agent.idle_timeout) == (5.0, 60.0, 15.0)


def test_the_agent_daemonset_has_the_capabilities_it_needs_and_no_privilege():
    objects = documents("antrea-flow-agent.yml")
    daemonset = find(objects, "DaemonSet", "antrea-flow-agent")
    assert daemonset["metadata"]["namespace"] == "kube-system"
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["serviceAccountName"] == "antrea-flow-agent"
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert "privileged" not in security
    assert set(security["capabilities"]["add"]) == {"NET_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE"}
    assert security["capabilities"]["drop"] == ["ALL"]
    # Only the init container that writes the two sysctls is privileged.
    (init,) = pod["initContainers"]
    assert init["securityContext"] == {"privileged": True}
    assert "nf_conntrack_acct" in init["command"][-1]
    assert "nf_conntrack_timestamp" in init["command"][-1]
    # It reads antrea-agent.conf from Antrea's ConfigMap.
    volume = next(v for v in pod["volumes"] if v["name"] == "antrea-config")
    assert volume["configMap"]["name"] == "antrea-config"
    assert volume["configMap"]["items"] == [
        {"key": "antrea-agent.conf", "path": "antrea-agent.conf"}
    ]
    assert container["args"][:2] == ["--config", "/etc/antrea/antrea-agent.conf"]
    assert container["args"][2:] == ["--node-name", "$(NODE_NAME)"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
    assert env["NODE_NAME"] == "spec.nodeName"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


# -- images ------------------------------------------------------------------------------


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) of a Dockerfile, continuation lines joined."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += line.removesuffix("\\") + " "
        if not line.endswith("\\"):
            instruction, _, rest = current.strip().partition(" ")
            lines.append((instruction.upper(), rest.strip()))
            current = ""
    return lines


IMAGES = [
    ("aggregator/Dockerfile", "aggregator", "/etc/flow-aggregator/flow-aggregator.conf"),
    ("exporter/Dockerfile", "agent", "/etc/antrea/antrea-agent.conf"),
]


@pytest.mark.parametrize(("path", "command", "config"), IMAGES)
def test_each_image_copies_files_that_exist_and_runs_the_installed_command(
    path, command, config, in_a_pod
):
    instructions = dockerfile(ROOT / path)
    copied = {}
    for instruction, arguments in instructions:
        if instruction == "COPY" and not arguments.startswith("--from"):
            *sources, target = shlex.split(arguments)
            for source in sources:
                assert (ROOT / source).exists(), f"{path}: COPY {source}: no such file"
                copied[target] = source
    # What the package's files link to is copied too (the wheel holds the targets).
    for link in (ROOT / "antrea_flow").rglob("*"):
        if link.is_symlink():
            target = link.resolve().relative_to(ROOT)
            assert any(target.is_relative_to(source) for source in copied.values()), (
                f"{path}: {link.relative_to(ROOT)} links to {target}, which no COPY brings"
            )
    # The default config the image ships is one the product loads.
    source = copied[config]
    loader = load_aggregator_config if command == "aggregator" else load_agent_config
    loader(ROOT / source)
    entry = next(a for i, a in instructions if i == "ENTRYPOINT")
    program, subcommand = yaml.safe_load(entry)
    scripts = configparser.ConfigParser()
    scripts.read(ROOT / "setup.cfg")
    console = scripts.get("options.entry_points", "console_scripts")
    assert f"{program} = antrea_flow.cli:main" in console
    cmd = yaml.safe_load(next(a for i, a in instructions if i == "CMD"))
    arguments = parser().parse_args([subcommand, *cmd])
    assert arguments.config == config
