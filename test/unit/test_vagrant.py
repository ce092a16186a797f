"""The Vagrant quick deployment (infra/vagrant/): its shell scripts pass shellcheck; the
Vagrantfile passes `vagrant validate` and, read through a Ruby stand-in for Vagrant's
configure API, defines the three machines with the right addresses, sizes and provisioning;
`push_antrea.sh --dry-run` shows every step and prints manifests that Kubernetes' schemas and
the product's own config loaders accept, with the collector settings asked for; the scripts'
usage errors are one line. Nothing here boots a VM, runs a container or reaches a network:
the external tools a run would call (vagrant, kubectl, docker, ssh, ...) are replaced by
stand-ins that record being called, and the dry run must call none of them."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest
import yaml

from antrea_flow.aggregator.config import AggregatorConfig, load_aggregator_config
from antrea_flow.exporter.config import load_agent_config
from antrea_flow.ipfix.address import TransportAddress

ROOT = Path(__file__).resolve().parents[2]
VAGRANT_DIR = ROOT / "infra" / "vagrant"
PUSH = VAGRANT_DIR / "push_antrea.sh"
PROVISION = VAGRANT_DIR / "provision.sh"
VAGRANTFILE = VAGRANT_DIR / "Vagrantfile"
FA_MANIFEST = "build/yamls/flow-aggregator.yml"
ELK_MANIFEST = "build/yamls/elk-flow-collector/elk-flow-collector.yml"
FLOW_VISIBILITY_MANIFEST = "build/yamls/flow-visibility/flow-visibility.yml"
CLICKHOUSE_URL = "http://clickhouse-clickhouse.flow-visibility.svc:8123"
KUBERNETES = "1.30"  # versions.env's K8S_MINOR: the schemas the printed objects must meet
VAGRANTFILE_NODES = ["k8s-node-control-plane", "k8s-node-worker-1", "k8s-node-worker-2"]
# What a run would call; the dry run and the usage errors must call none of them.
EXTERNAL_TOOLS = ("vagrant", "kubectl", "docker", "podman", "ssh", "scp", "ctr", "VBoxManage")
PUSH_USAGE = (
    "usage: push_antrea.sh [--flow-collector ELK|<HOST>:<PORT>[:tcp|udp]] [--clickhouse] "
    "[--dry-run] [-h|--help]"
)
COLLECTOR_FORM = "ELK or <HOST>:<PORT>[:tcp|udp]"


# --- stand-ins for external tools --------------------------------------------------------


@dataclass
class Tools:
    """A PATH whose first directory holds recording stand-ins for EXTERNAL_TOOLS."""

    env: dict[str, str]
    log: Path

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def make_tools(directory: Path) -> Tools:
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    log = directory / "calls.log"
    for name in EXTERNAL_TOOLS:
        stand_in = bin_dir / name
        stand_in.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\nexit 97\n')
        stand_in.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    env.pop("K8S_NODE_LARGE", None)
    return Tools(env=env, log=log)


@pytest.fixture
def tools(tmp_path: Path) -> Tools:
    return make_tools(tmp_path)


# --- shellcheck --------------------------------------------------------------------------


def shell_scripts() -> list[Path]:
    return sorted(VAGRANT_DIR.rglob("*.sh"))


def test_the_deployment_has_its_scripts():
    names = {str(p.relative_to(VAGRANT_DIR)) for p in shell_scripts()}
    assert {
        "provision.sh",
        "push_antrea.sh",
        "suspend.sh",
        "resume.sh",
        "destroy.sh",
        "provision/common.sh",
        "provision/control-plane.sh",
        "provision/worker.sh",
    } <= names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(VAGRANT_DIR)))
def test_scripts_follow_the_conventions(script: Path):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), f"{script}: not a bash script"
    assert "\nset -euo pipefail\n" in text, f"{script}: no `set -euo pipefail`"
    assert os.access(script, os.X_OK), f"{script} is not executable"


@pytest.mark.needs("shellcheck")
def test_shellcheck_is_clean_on_every_script():
    scripts = shell_scripts()
    result = subprocess.run(
        ["shellcheck", "--severity=style", "--external-sources", *map(str, scripts)],
        capture_output=True,
        text=True,
        cwd=VAGRANT_DIR,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the Vagrantfile ---------------------------------------------------------------------


def vagrant_project(tmp_path: Path) -> Path:
    """A copy of what `vagrant validate` reads (so its .vagrant/ is not made in the repo)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("Vagrantfile", "versions.env"):
        shutil.copy(VAGRANT_DIR / name, project / name)
    shutil.copytree(VAGRANT_DIR / "provision", project / "provision")
    return project


def vagrant_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The real vagrant's environment: off the network, out of the user's ~/.vagrant.d."""
    environment = {k: v for k, v in os.environ.items() if k != "K8S_NODE_LARGE"}
    return dict(
        environment,
        VAGRANT_HOME=str(tmp_path / "vagrant.d"),
        VAGRANT_CHECKPOINT_DISABLE="1",
        VAGRANT_BOX_UPDATE_CHECK_DISABLE="1",
        **extra,
    )


def real_vagrant() -> str:
    path = shutil.which("vagrant")
    assert path is not None
    return path


@pytest.mark.needs("vagrant")
@pytest.mark.parametrize("large", ["false", "true"])
def test_vagrant_validate_accepts_the_vagrantfile(tmp_path: Path, large: str):
    # Without --ignore-provider, validate needs a usable provider: here it stops at "No usable
    # default provider could be found for your system" (VirtualBox is not installed). With
    # it, everything but the provider blocks is checked (settings, networks, provisioners'
    # paths), offline and without the box.
    result = subprocess.run(
        [real_vagrant(), "validate", "--ignore-provider"],
        cwd=vagrant_project(tmp_path),
        env=vagrant_env(tmp_path, K8S_NODE_LARGE=large),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Vagrantfile validated successfully." in result.stdout


def fake_virtualbox(tmp_path: Path) -> Path:
    """A VBoxManage that answers only `--version`: all Vagrant's VirtualBox provider asks
    before it validates its own settings (vb.memory, vb.cpus)."""
    bin_dir = tmp_path / "vbox-bin"
    bin_dir.mkdir()
    vboxmanage = bin_dir / "VBoxManage"
    vboxmanage.write_text(
        '#!/bin/sh\nif [ "$1" = --version ]; then echo 7.0.14r161095; exit 0; fi\nexit 97\n'
    )
    vboxmanage.chmod(0o755)
    return bin_dir


@pytest.mark.needs("vagrant")
def test_vagrant_validate_checks_the_virtualbox_settings(tmp_path: Path):
    project = vagrant_project(tmp_path)
    env = vagrant_env(tmp_path, VAGRANT_DEFAULT_PROVIDER="virtualbox")
    env["PATH"] = f"{fake_virtualbox(tmp_path)}{os.pathsep}{env['PATH']}"

    def validate() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [real_vagrant(), "validate"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    result = validate()
    assert result.returncode == 0, result.stdout + result.stderr
    # The same validation rejects a misspelled provider setting: the check is real.
    vagrantfile = project / "Vagrantfile"
    text = vagrantfile.read_text()
    assert "vb.memory = MEMORY" in text
    vagrantfile.write_text(text.replace("vb.memory = MEMORY", "vb.memroy = MEMORY"))
    broken = validate()
    assert broken.returncode != 0
    assert "The following settings shouldn't exist: memroy" in broken.stdout + broken.stderr


@pytest.mark.needs("ruby")
def test_the_vagrantfile_is_valid_ruby():
    result = subprocess.run(["ruby", "-c", str(VAGRANTFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Syntax OK" in result.stdout


# Vagrant's configure API as far as a Vagrantfile uses it, recording instead of acting:
# settings (`x.box = v`), namespaces (`config.vm`) and calls with arguments and an optional
# block (define, network, provider, provision, synced_folder). Prints what it recorded.
RUBY_STAND_IN = r"""
require "json"

class Recorder
  def initialize
    @settings = {}
    @calls = []
  end

  def method_missing(name, *args, **options, &block)
    key = name.to_s
    if key.end_with?("=")
      @settings[key.chomp("=")] = args.first
    elsif args.empty? && options.empty? && block.nil?
      @settings[key] ||= Recorder.new
    else
      inner = block && Recorder.new
      block&.call(inner)
      @calls << { "call" => key, "args" => args, "options" => options, "block" => inner }
      nil
    end
  end

  def respond_to_missing?(*) = true

  def to_h
    {
      "settings" => @settings.transform_values { |v| v.is_a?(Recorder) ? v.to_h : v },
      "calls" => @calls.map { |c| c.merge("block" => c["block"]&.to_h) },
    }
  end
end

module Vagrant
  @configs = []

  def self.configure(version)
    raise "Vagrant.configure(#{version.inspect}): expected \"2\"" unless version == "2"
    config = Recorder.new
    yield config
    @configs << config
  end

  def self.configs = @configs
end

load ARGV.fetch(0)
puts JSON.generate(Vagrant.configs.map(&:to_h))
"""


@dataclass
class Machine:
    name: str
    hostname: str
    networks: list[tuple[str, dict[str, Any]]]
    providers: dict[str, dict[str, Any]]  # the global block, then the machine's over it
    provisioners: list[tuple[str, dict[str, Any]]]


def read_vagrantfile(tmp_path: Path, **env: str) -> tuple[dict[str, Any], list[Machine]]:
    stand_in = tmp_path / "vagrant_stand_in.rb"
    stand_in.write_text(RUBY_STAND_IN)
    environment = {k: v for k, v in os.environ.items() if k != "K8S_NODE_LARGE"} | env
    result = subprocess.run(
        ["ruby", str(stand_in), str(VAGRANTFILE)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    (config,) = json.loads(result.stdout)
    vm = config["settings"]["vm"]
    providers = {
        c["args"][0]: c["block"]["settings"] for c in vm["calls"] if c["call"] == "provider"
    }
    machines = []
    for call in vm["calls"]:
        if call["call"] != "define":
            continue
        machine_vm = call["block"]["settings"]["vm"]
        merged = {name: dict(settings) for name, settings in providers.items()}
        for c in machine_vm["calls"]:
            if c["call"] == "provider":
                merged.setdefault(c["args"][0], {}).update(c["block"]["settings"])
        machines.append(
            Machine(
                name=call["args"][0],
                hostname=machine_vm["settings"].get("hostname", ""),
                networks=[
                    (c["args"][0], c["options"])
                    for c in machine_vm["calls"]
                    if c["call"] == "network"
                ],
                providers=merged,
                provisioners=[
                    (c["args"][0], c["options"])
                    for c in machine_vm["calls"]
                    if c["call"] == "provision"
                ],
            )
        )
    return vm, machines


@pytest.mark.needs("ruby")
@pytest.mark.parametrize(("large", "memory"), [(None, 2048), ("false", 2048), ("true", 4096)])
def test_the_vagrantfile_defines_the_cluster(tmp_path: Path, large: str | None, memory: int):
    env = {"K8S_NODE_LARGE": large} if large is not None else {}
    vm, machines = read_vagrantfile(tmp_path, **env)
    assert vm["settings"]["box"] == "ubuntu/jammy64"
    # The control plane first: `vagrant up` brings machines up in this order, and the workers
    # wait for the join command it writes.
    assert [m.name for m in machines] == VAGRANTFILE_NODES
    expected_ips = ["192.168.77.100", "192.168.77.101", "192.168.77.102"]
    for machine, ip in zip(machines, expected_ips, strict=True):
        assert machine.hostname == machine.name
        assert machine.networks == [("private_network", {"ip": ip})]
        assert machine.providers["virtualbox"] == {"cpus": 2, "memory": memory}
        assert machine.providers["libvirt"] == {"cpus": 2, "memory": memory}
        for _, options in machine.provisioners:
            assert options["type"] == "shell"
            assert (VAGRANT_DIR / options["path"]).is_file(), options["path"]
            assert options["env"]["NODE_IP"] == ip
            assert re.fullmatch(r"1\.\d+", options["env"]["K8S_MINOR"])


@pytest.mark.needs("ruby")
def test_the_vagrantfile_provisions_kubeadm_and_antrea(tmp_path: Path):
    _, machines = read_vagrantfile(tmp_path)
    control_plane, *workers = machines
    scripts = [options["path"] for _, options in control_plane.provisioners]
    assert scripts == ["provision/common.sh", "provision/control-plane.sh"]
    env = control_plane.provisioners[1][1]["env"]
    assert env["POD_CIDR"] == "10.10.0.0/16"
    assert env["SERVICE_CIDR"] == "10.96.0.0/12"
    # A pinned release's manifest, never a moving one.
    assert re.fullmatch(
        r"https://github\.com/antrea-io/antrea/releases/download/v\d+\.\d+\.\d+/antrea\.yml",
        env["ANTREA_MANIFEST_URL"],
    )
    for worker in workers:
        scripts = [options["path"] for _, options in worker.provisioners]
        assert scripts == ["provision/common.sh", "provision/worker.sh"]
        assert worker.provisioners[1][1]["env"]["CONTROL_PLANE_IP"] == "192.168.77.100"


@pytest.mark.needs("ruby")
def test_the_vagrantfile_refuses_a_wrong_large_value(tmp_path: Path):
    stand_in = tmp_path / "vagrant_stand_in.rb"
    stand_in.write_text(RUBY_STAND_IN)
    result = subprocess.run(
        ["ruby", str(stand_in), str(VAGRANTFILE)],
        capture_output=True,
        text=True,
        env=dict(os.environ, K8S_NODE_LARGE="yes"),
        timeout=60,
    )
    assert result.returncode != 0
    assert "K8S_NODE_LARGE=yes is not allowed: expected true or false" in result.stderr


def test_cluster_files_are_kept_out_of_git():
    ignored = (VAGRANT_DIR / ".gitignore").read_text().split()
    assert {"kube/", "ssh-config", ".vagrant/"} <= set(ignored)


# --- push_antrea.sh --dry-run ------------------------------------------------------------

MANIFEST = re.compile(
    r"^#### begin manifest: (?P<label>.+)\n(?P<body>.*?)^#### end manifest: (?P=label)\n",
    re.MULTILINE | re.DOTALL,
)


@dataclass
class DryRun:
    stdout: str
    manifests: dict[str, str]  # label: text

    def manifest(self, label_start: str) -> tuple[str, str]:
        found = [(k, v) for k, v in self.manifests.items() if k.startswith(label_start)]
        assert len(found) == 1, f"manifests starting {label_start!r}: {list(self.manifests)}"
        return found[0]

    def nodes(self) -> list[str]:
        line = next(x for x in self.stdout.splitlines() if x.startswith("# Nodes: "))
        return line.removeprefix("# Nodes: ").split(" (")[0].split()


def run_push(tools: Tools, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(PUSH), *args],
        cwd=cwd,  # not the repository: the script finds it from its own path
        env=tools.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def dry_run(tools: Tools, cwd: Path, *args: str) -> DryRun:
    result = run_push(tools, cwd, "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert tools.calls() == [], "the dry run ran external tools"
    return DryRun(
        stdout=result.stdout,
        manifests={m["label"]: m["body"] for m in MANIFEST.finditer(result.stdout)},
    )


# (arguments, the collector address expected in flow-aggregator.conf, ELK, ClickHouse)
CASES = {
    "no-collector": ([], None, False, False),
    "ipfix-collector": (
        ["--flow-collector", "10.0.0.5:4739:tcp"],
        TransportAddress("10.0.0.5", 4739, "tcp"),
        False,
        False,
    ),
    "elk": (
        ["--flow-collector", "ELK"],
        TransportAddress("LOGSTASH_CLUSTER_IP", 4739, "udp"),
        True,
        False,
    ),
    "clickhouse": (["--clickhouse"], None, False, True),
    "elk-and-clickhouse": (
        ["--flow-collector", "ELK", "--clickhouse"],
        TransportAddress("LOGSTASH_CLUSTER_IP", 4739, "udp"),
        True,
        True,
    ),
}


class DryRuns:
    """Each case's dry run, run once for the module's tests (with its own stand-ins)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.runs: dict[str, DryRun] = {}

    def __getitem__(self, case: str) -> DryRun:
        if case not in self.runs:
            directory = self.directory / case
            directory.mkdir()
            self.runs[case] = dry_run(make_tools(directory), directory, *CASES[case][0])
        return self.runs[case]


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory: pytest.TempPathFactory) -> DryRuns:
    return DryRuns(tmp_path_factory.mktemp("dry-runs"))


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def the_configmap(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("case", CASES)
def test_dry_run_shows_every_step(dry_runs: DryRuns, case: str):
    _, _, elk, clickhouse = CASES[case]
    run = dry_runs[case]
    out = run.stdout
    assert (
        "docker build -f aggregator/Dockerfile -t docker.io/antrea-flow/flow-aggregator:latest ."
        in out
    )
    assert "docker save -o " in out
    nodes = run.nodes()
    if not (VAGRANT_DIR / "ssh-config").exists():
        assert nodes == VAGRANTFILE_NODES
    for node in nodes:
        assert f"+ [{node}] sudo ctr -n=k8s.io image import " in out
    kubectl = "+ [k8s-node-control-plane] kubectl "
    for line in (
        "-n flow-aggregator rollout status deployment/flow-aggregator --timeout=300s",
        "replace -f - < (the manifest 'kube-system/antrea-config",
        "-n kube-system rollout restart daemonset/antrea-agent",
        "-n kube-system rollout status daemonset/antrea-agent --timeout=300s",
    ):
        assert kubectl + line in out
    # In the order that matters: collectors, then the aggregator, then the agents.
    order = [
        out.index(f"#### begin manifest: {FA_MANIFEST}"),
        out.index("#### begin manifest: kube-system/antrea-config"),
    ]
    if elk:
        order.insert(0, out.index(f"#### begin manifest: {ELK_MANIFEST}"))
    if clickhouse:
        order.insert(-2, out.index(f"#### begin manifest: {FLOW_VISIBILITY_MANIFEST}"))
    assert order == sorted(order)
    # Where to look.
    assert "kubectl -n flow-aggregator logs deploy/flow-aggregator" in out
    assert ("http://192.168.77.100:30007" in out) == elk
    assert ("http://192.168.77.100:30008" in out) == clickhouse


@pytest.mark.parametrize("case", CASES)
def test_dry_run_manifests_are_valid(dry_runs: DryRuns, case: str):
    _, _, elk, clickhouse = CASES[case]
    run = dry_runs[case]
    expected = 2 + elk + clickhouse
    assert len(run.manifests) == expected, list(run.manifests)
    for label, text in run.manifests.items():
        docs = documents(text)
        assert docs, f"{label}: no objects"
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{label}: {doc}"
    # Ours against Kubernetes' schemas (the collectors' may hold custom resources).
    for label in (FA_MANIFEST, "kube-system/antrea-config"):
        for doc in documents(run.manifest(label)[1]):
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_dry_run_points_the_aggregator_at_the_collectors(
    dry_runs: DryRuns, tmp_path: Path, case: str
):
    args, collector, elk, clickhouse = CASES[case]
    run = dry_runs[case]
    label, text = run.manifest(FA_MANIFEST)
    printed = documents(text)
    original = documents((ROOT / FA_MANIFEST).read_text())
    name = "flow-aggregator-configmap"
    conf = the_configmap(printed, name)["data"]["flow-aggregator.conf"]
    original_conf = the_configmap(original, name)["data"]["flow-aggregator.conf"]
    # Only flow-aggregator.conf changes, and only by what was asked for: its comments stay.
    assert [d for d in printed if d["kind"] != "ConfigMap"] == [
        d for d in original if d["kind"] != "ConfigMap"
    ]
    assert conf.startswith(original_conf.rstrip("\n"))
    added = yaml.safe_load(conf) or {}
    assert added.keys() - (yaml.safe_load(original_conf) or {}).keys() == (
        ({"flowCollector"} if collector else set()) | ({"clickHouse"} if clickhouse else set())
    )

    path = tmp_path / "flow-aggregator.conf"
    path.write_text(conf)
    config = load_aggregator_config(path)  # the product's own loader
    assert config.external_collector == collector
    if collector:
        assert added["flowCollector"] == {"enable": True, "address": collector_text(args)}
    if elk:
        assert "DRY RUN PLACEHOLDER" in label
        assert "DRY RUN PLACEHOLDER" in run.stdout.split(f"#### begin manifest: {FA_MANIFEST}")[0]

    if clickhouse:
        assert added["clickHouse"] == {"enable": True, "databaseURL": CLICKHOUSE_URL}
    else:
        assert "clickHouse" not in added
    # Through the loader too, once it reads the clickHouse section.
    if "clickhouse" in AggregatorConfig.__dataclass_fields__:
        sink = config.clickhouse
        if clickhouse:
            assert sink is not None
            assert getattr(sink, "url", None) == CLICKHOUSE_URL, sink
        else:
            assert sink is None


def collector_text(args: list[str]) -> str:
    value = args[args.index("--flow-collector") + 1]
    return "LOGSTASH_CLUSTER_IP:4739:udp" if value == "ELK" else value


@pytest.mark.parametrize("case", CASES)
def test_dry_run_turns_on_the_flow_exporter_of_antreas_agents(
    dry_runs: DryRuns, tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
):
    run = dry_runs[case]
    label, text = run.manifest("kube-system/antrea-config")
    assert "DRY RUN STAND-IN" in label
    (configmap,) = documents(text)
    assert configmap["kind"] == "ConfigMap"
    assert configmap["metadata"]["name"] == "antrea-config"
    assert configmap["metadata"]["namespace"] == "kube-system"
    assert "resourceVersion" in configmap["metadata"]  # for `kubectl replace`
    conf = tmp_path / "antrea-agent.conf"
    conf.write_text(configmap["data"]["antrea-agent.conf"])
    # The agent runs in a Pod: it fetches the aggregator's CA and client certificate.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    config = load_agent_config(conf)  # the product's own loader
    assert config.flow_exporter_enabled is True
    assert config.collector == TransportAddress("flow-aggregator.flow-aggregator.svc", 4739, "tls")
    agent_conf = yaml.safe_load(conf.read_text())
    assert agent_conf["featureGates"]["FlowExporter"] is True
    assert agent_conf["flowExporter"]["enable"] is True
    assert agent_conf["flowExporter"]["flowCollectorAddr"] == (
        "flow-aggregator/flow-aggregator:4739:tls"
    )


@pytest.mark.parametrize(
    ("case", "path"),
    [("elk", ELK_MANIFEST), ("clickhouse", FLOW_VISIBILITY_MANIFEST)],
)
def test_dry_run_prints_a_collector_manifest_only_when_asked(
    dry_runs: DryRuns, case: str, path: str
):
    for other, (_, _, elk, clickhouse) in CASES.items():
        asked = elk if case == "elk" else clickhouse
        run = dry_runs[other]
        if asked:
            label, text = run.manifest(path)
            assert label == path
            assert documents(text) == documents((ROOT / path).read_text()), other
        else:
            assert not [k for k in run.manifests if k.startswith(path)], other


@pytest.mark.parametrize(
    "value",
    [
        "collector.example.com:4739",
        "collector1:4739",
        "[fd00::5]:4739:udp",
        "elk",
        "10.0.0.5:2055:udp",
    ],
)
def test_dry_run_accepts_collector_addresses(tools: Tools, tmp_path: Path, value: str):
    run = dry_run(tools, tmp_path, f"--flow-collector={value}")
    assert run.manifest(FA_MANIFEST)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown flag '--bogus'"),
        (["extra"], "unexpected argument 'extra'"),
        (["--flow-collector"], f"--flow-collector needs a value: {COLLECTOR_FORM}"),
        (["--flow-collector", "--clickhouse"], f"--flow-collector needs a value: {COLLECTOR_FORM}"),
        (["--flow-collector", "10.0.0.5"], f"'10.0.0.5' is not valid: expected {COLLECTOR_FORM}"),
        (
            ["-fc", "10.0.0.5:4739:tls"],
            f"-fc '10.0.0.5:4739:tls' is not valid: expected {COLLECTOR_FORM}",
        ),
        (["--flow-collector", "10.0.0.256:4739"], "is not valid"),
        (["--flow-collector", "10.0.0.5:0"], "is not valid"),
        (["--flow-collector", "10.0.0:4739"], "is not valid"),
        (["--flow-collector", "bad_name:4739"], "is not valid"),
        (["--flow-collector", "10.0.0.5:65536"], "is not valid"),
        (["--flow-collector", "fd00::5:4739"], "is not valid"),
        (["--flow-collector", "ELK", "--flow-collector", "10.0.0.5:4739"], "given twice"),
    ],
)
def test_push_antrea_usage_errors_are_one_line(
    tools: Tools, tmp_path: Path, args: list[str], message: str
):
    result = run_push(tools, tmp_path, "--dry-run", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("push_antrea.sh: ")
    assert message in lines[0]
    assert lines[0].endswith(PUSH_USAGE)
    assert tools.calls() == []


def test_push_antrea_help(tools: Tools, tmp_path: Path):
    result = run_push(tools, tmp_path, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(PUSH_USAGE + "\n")
    assert "--dry-run" in result.stdout
    assert tools.calls() == []


def path_without_docker(tools: Tools, keep: tuple[str, ...]) -> str:
    """The stand-ins in `keep`, then only /usr/bin and /bin (bash, python3, coreutils)."""
    for directory in ("/usr/bin", "/bin"):
        for name in ("docker", "podman"):
            if Path(directory, name).exists():
                pytest.skip(f"{directory}/{name} exists: no PATH without it can be made here")
    stand_ins = Path(tools.env["PATH"].split(os.pathsep)[0])
    only = stand_ins.parent / "only-bin"
    only.mkdir()
    for name in keep:
        (only / name).symlink_to(stand_ins / name)
    return os.pathsep.join([str(only), "/usr/bin", "/bin"])


def test_dry_run_builds_with_podman_without_docker(tools: Tools, tmp_path: Path):
    tools.env["PATH"] = path_without_docker(tools, keep=("podman",))
    run = dry_run(tools, tmp_path)
    assert "+ podman build -f aggregator/Dockerfile " in run.stdout
    assert "+ podman save -o " in run.stdout


def push_from_a_copy(tools: Tools, tmp_path: Path, ssh_config: bool) -> subprocess.CompletedProcess:
    """push_antrea.sh run for real from a copy of the scripts and manifests (with or
    without the ssh-config provision.sh leaves)."""
    repo = tmp_path / "repo"
    shutil.copytree(VAGRANT_DIR, repo / "infra" / "vagrant", ignore=ignore_cluster_files)
    shutil.copytree(ROOT / "build" / "yamls", repo / "build" / "yamls")
    if ssh_config:
        (repo / "infra" / "vagrant" / "ssh-config").write_text(SSH_CONFIG)
    return subprocess.run(
        ["bash", str(repo / "infra" / "vagrant" / "push_antrea.sh")],
        cwd=tmp_path,
        env=tools.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_real_run_needs_docker_or_podman(tools: Tools, tmp_path: Path):
    tools.env["PATH"] = path_without_docker(tools, keep=("ssh", "scp", "kubectl"))
    result = push_from_a_copy(tools, tmp_path, ssh_config=True)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "push_antrea.sh: neither docker nor podman is on PATH: one is needed to build "
        "docker.io/antrea-flow/flow-aggregator:latest"
    )
    assert tools.calls() == []


def test_push_antrea_needs_ssh_config_for_a_real_run(tools: Tools, tmp_path: Path):
    # Without ssh-config a real run stops before touching anything.
    result = push_from_a_copy(tools, tmp_path, ssh_config=False)
    assert result.returncode == 1
    assert "ssh-config not found: run " in result.stderr
    assert "provision.sh first" in result.stderr
    assert tools.calls() == []


def ignore_cluster_files(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("ssh-config", "kube", ".vagrant")]


# --- push_antrea.sh for real, against stand-in Nodes --------------------------------------

# Every stand-in logs its name and arguments, one shell-quoted line per call.
# One write per call: the script runs copies in parallel, and lines written in parts by
# several of them at once would interleave.
RECORD = (
    'line="$(printf %q "$(basename "$0")"; printf " %q" "$@")"; printf "%s\\n" "$line" >> "$LOG"\n'
)
# ssh -F CONFIG HOST -- COMMAND: the command is run by a local shell, as the Node's would.
FAKE_SSH = RECORD + '[ "$1" = -F ] && shift 2\nshift\n[ "$1" = -- ] && shift\nexec bash -c "$1"\n'
FAKE_SUDO = RECORD + 'exec "$@"\n'
FAKE_DOCKER = RECORD + 'if [ "$1" = save ]; then : > "$3"; fi\n'
# kubectl answering as a cluster with Antrea v2.2.0 and no flow aggregator yet would; what
# is sent to `apply -f -` or `replace -f -` is kept in $STATE/sent-<n>.yml.
FAKE_KUBECTL = (
    RECORD
    + """case "$*" in
  *"apply -f -"* | *"replace -f -"*) cat > "$STATE/sent-$(ls "$STATE" | wc -l).yml" ;;
  *"get deployment flow-aggregator"*) exit 1 ;;
  *"get svc logstash"*) printf 10.96.100.5 ;;
  *"get deployments,statefulsets,daemonsets -o name"*) echo deployment.apps/logstash ;;
  *"get daemonset antrea-agent"*) printf antrea/antrea-agent-ubuntu:v2.2.0 ;;
  *"get configmap antrea-config -o yaml"*) cat "$ANTREA_CONFIG" ;;
esac
"""
)
SSH_CONFIG = "".join(
    f"Host {node}\n  HostName 127.0.0.1\n  Port {2200 + i}\n  User vagrant\n\n"
    for i, node in enumerate(VAGRANTFILE_NODES)
)


@dataclass
class RealRun:
    result: subprocess.CompletedProcess[str]
    calls: list[list[str]]  # each call's program and arguments
    sent: list[str]  # what kubectl received on standard input, in order

    def kubectl(self) -> list[list[str]]:
        return [c[1:] for c in self.calls if c[0] == "kubectl"]


def real_run(tmp_path: Path, *args: str) -> RealRun:
    """push_antrea.sh without --dry-run, from a copy of the repository's deployment files
    with an ssh-config, against stand-ins for docker, ssh, scp, sudo, ctr and kubectl."""
    repo = tmp_path / "repo"
    shutil.copytree(VAGRANT_DIR, repo / "infra" / "vagrant", ignore=ignore_cluster_files)
    shutil.copytree(ROOT / "build" / "yamls", repo / "build" / "yamls")
    (repo / "infra" / "vagrant" / "ssh-config").write_text(SSH_CONFIG)
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    programs = {
        "ssh": FAKE_SSH,
        "scp": RECORD,
        "sudo": FAKE_SUDO,
        "ctr": RECORD,
        "docker": FAKE_DOCKER,
        "kubectl": FAKE_KUBECTL,
        "vagrant": RECORD + "exit 97\n",
    }
    for name, body in programs.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        LOG=str(log),
        STATE=str(state),
        ANTREA_CONFIG=str(VAGRANT_DIR / "dry-run-antrea-config.yml"),
    )
    result = subprocess.run(
        ["bash", str(repo / "infra" / "vagrant" / "push_antrea.sh"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    calls = [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []
    sent = [(state / f"sent-{i}.yml").read_text() for i in range(len(list(state.iterdir())))]
    return RealRun(result=result, calls=calls, sent=sent)


def test_a_real_run_imports_the_image_and_configures_the_cluster(tmp_path: Path):
    run = real_run(tmp_path, "--flow-collector", "10.0.0.5:4739:tcp")
    assert run.result.returncode == 0, run.result.stdout + run.result.stderr
    image = "docker.io/antrea-flow/flow-aggregator:latest"
    assert ["docker", "build", "-f", "aggregator/Dockerfile", "-t", image, "."] in run.calls
    (save,) = [c for c in run.calls if c[:2] == ["docker", "save"]]
    for node in VAGRANTFILE_NODES:
        assert [
            "scp",
            "-F",
            ANY,
            "-q",
            save[3],
            f"{node}:/tmp/antrea-flow-flow-aggregator.tar",
        ] in (run.calls)
    imports = [c for c in run.calls if c[0] == "ctr"]
    assert (
        imports
        == [["ctr", "-n=k8s.io", "image", "import", "/tmp/antrea-flow-flow-aggregator.tar"]] * 3
    )
    # Arguments reach kubectl on the control plane exactly, through ssh's remote shell.
    kubectl = run.kubectl()
    assert [
        "-n",
        "kube-system",
        "get",
        "daemonset",
        "antrea-agent",
        "-o",
        'jsonpath={.spec.template.spec.containers[?(@.name=="antrea-agent")].image}',
    ] in kubectl
    assert ["apply", "-f", "-"] in kubectl and ["replace", "-f", "-"] in kubectl
    # A fresh flow aggregator is not restarted; the agents are, to read their new config.
    assert [
        "-n",
        "flow-aggregator",
        "rollout",
        "restart",
        "deployment/flow-aggregator",
    ] not in kubectl
    waits = [
        [
            "-n",
            "flow-aggregator",
            "rollout",
            "status",
            "deployment/flow-aggregator",
            "--timeout=300s",
        ],
        ["-n", "kube-system", "rollout", "restart", "daemonset/antrea-agent"],
        ["-n", "kube-system", "rollout", "status", "daemonset/antrea-agent", "--timeout=300s"],
    ]
    assert [c for c in kubectl if c in waits] == waits

    aggregator, antrea_config = run.sent
    conf = the_configmap(documents(aggregator), "flow-aggregator-configmap")["data"]
    assert yaml.safe_load(conf["flow-aggregator.conf"])["flowCollector"] == {
        "enable": True,
        "address": "10.0.0.5:4739:tcp",
    }
    (configmap,) = documents(antrea_config)
    agent_conf = yaml.safe_load(configmap["data"]["antrea-agent.conf"])
    assert agent_conf["featureGates"]["FlowExporter"] is True
    assert agent_conf["flowExporter"]["enable"] is True
    assert "kubectl -n flow-aggregator logs deploy/flow-aggregator" in run.result.stdout


def test_a_real_run_sends_the_records_to_logstash(tmp_path: Path):
    run = real_run(tmp_path, "--flow-collector", "ELK")
    assert run.result.returncode == 0, run.result.stdout + run.result.stderr
    elk, aggregator, _ = run.sent
    assert documents(elk) == documents((ROOT / ELK_MANIFEST).read_text())
    conf = the_configmap(documents(aggregator), "flow-aggregator-configmap")["data"]
    # The Logstash Service's ClusterIP, read from the cluster; IPFIX over UDP.
    assert yaml.safe_load(conf["flow-aggregator.conf"])["flowCollector"] == {
        "enable": True,
        "address": "10.96.100.5:4739:udp",
    }
    assert [
        "-n",
        "elk-flow-collector",
        "rollout",
        "status",
        "deployment.apps/logstash",
        "--timeout=600s",
    ] in run.kubectl()
    assert "http://192.168.77.100:30007" in run.result.stdout


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY = _Any()


# --- patch_config.py, the config editor behind push_antrea.sh ----------------------------


def patcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("patch_config", VAGRANT_DIR / "patch_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_editing_keeps_other_gates_and_comments():
    text = (
        "# the gates\n"
        "featureGates:\n"
        "  AntreaProxy: true\n"
        "# commented inside the block\n"
        "  FlowExporter: false\n"
        "\n"
        "# the bridge\n"
        "ovsBridge: br-int\n"
    )
    edited = patcher().edit_config(text, {"featureGates": {"FlowExporter": True}}, "test")
    assert yaml.safe_load(edited) == {
        "featureGates": {"AntreaProxy": True, "FlowExporter": True},
        "ovsBridge": "br-int",
    }
    assert "# the gates\n" in edited
    assert "# the bridge\novsBridge: br-int\n" in edited


def test_editing_falls_back_to_writing_the_whole_config():
    text = "{featureGates: {AntreaProxy: true}, ovsBridge: br-int}\n"
    edited = patcher().edit_config(text, {"featureGates": {"FlowExporter": True}}, "test")
    assert yaml.safe_load(edited) == {
        "featureGates": {"AntreaProxy": True, "FlowExporter": True},
        "ovsBridge": "br-int",
    }


@pytest.mark.parametrize(
    ("version", "key", "address"),
    [
        ("v1.12.1", "flowCollectorAddr", "flow-aggregator/flow-aggregator:4739:tls"),
        ("v1.10.0", "flowCollectorAddr", "flow-aggregator.flow-aggregator.svc:4739:tls"),
        ("v1.13.0", "flowExporter", "flow-aggregator/flow-aggregator:4739:tls"),
        ("latest", "flowExporter", "flow-aggregator/flow-aggregator:4739:tls"),
    ],
)
def test_the_agent_keys_follow_the_antrea_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str, key: str, address: str
):
    # Before v1.13 the keys were flat; before v1.11 the Service was named by its DNS name.
    text = (VAGRANT_DIR / "dry-run-antrea-config.yml").read_text()
    configmap = yaml.safe_load(text)
    configmap["data"]["antrea-agent.conf"] = "featureGates:\n#  FlowExporter: false\n"
    configmap["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    patched = yaml.safe_load(patcher().patch_antrea_config(yaml.safe_dump(configmap), "t", version))
    assert "managedFields" not in patched["metadata"]
    conf = yaml.safe_load(patched["data"]["antrea-agent.conf"])
    assert conf["featureGates"] == {"FlowExporter": True}
    value = conf[key]["flowCollectorAddr"] if key == "flowExporter" else conf[key]
    assert value == address
    path = tmp_path / "antrea-agent.conf"
    path.write_text(patched["data"]["antrea-agent.conf"])
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    config = load_agent_config(path)
    assert config.flow_exporter_enabled is True
    assert config.collector == TransportAddress("flow-aggregator.flow-aggregator.svc", 4739, "tls")


def test_the_editor_reports_bad_input_in_one_line(tmp_path: Path):
    bad = tmp_path / "antrea-config.yml"
    bad.write_text("kind: ConfigMap\ndata:\n  antrea-agent.conf: |\n    - a list\n")
    result = subprocess.run(
        [
            sys.executable,
            str(VAGRANT_DIR / "patch_config.py"),
            "antrea-config",
            "--antrea-version=v2.2.0",
            str(bad),
        ],
        capture_output=True,
        text=True,
        input="",
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"patch_config.py: {bad}: antrea-agent.conf is a list, expected a mapping of keys\n"
    )


# --- provision.sh ------------------------------------------------------------------------


@pytest.fixture
def provision_copy(tmp_path: Path) -> Path:
    """provision.sh alone in a directory: it writes ssh-config beside itself."""
    directory = tmp_path / "vagrant"
    directory.mkdir()
    shutil.copy(PROVISION, directory / "provision.sh")
    return directory / "provision.sh"


def recording_vagrant(tools: Tools, fail_up: bool = False) -> None:
    """Replaces the vagrant stand-in by one that records its arguments and K8S_NODE_LARGE
    and answers `ssh-config` as vagrant would."""
    vagrant = Path(tools.env["PATH"].split(os.pathsep)[0]) / "vagrant"
    vagrant.write_text(
        "#!/bin/sh\n"
        f'echo "vagrant $* K8S_NODE_LARGE=${{K8S_NODE_LARGE-unset}}" >> "{tools.log}"\n'
        'if [ "$1" = ssh-config ]; then\n'
        "  printf 'Host k8s-node-control-plane\\n  HostName 127.0.0.1\\n'\n"
        "fi\n"
        f"exit {1 if fail_up else 0}\n"
    )


def run_provision(tools: Tools, script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(script), *args],
        cwd=script.parent.parent,
        env=tools.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "large"), [([], "false"), (["--large"], "true"), (["-l"], "true")]
)
def test_provision_brings_the_cluster_up(
    tools: Tools, provision_copy: Path, args: list[str], large: str
):
    recording_vagrant(tools)
    result = run_provision(tools, provision_copy, *args)
    assert result.returncode == 0, result.stderr
    assert tools.calls() == [
        f"vagrant up --provision K8S_NODE_LARGE={large}",
        f"vagrant ssh-config K8S_NODE_LARGE={large}",
    ]
    ssh_config = provision_copy.parent / "ssh-config"
    assert ssh_config.read_text().startswith("Host k8s-node-control-plane\n")
    assert f"{provision_copy.parent}/kube/config" in result.stdout


def test_provision_stops_when_vagrant_fails(tools: Tools, provision_copy: Path):
    recording_vagrant(tools, fail_up=True)
    result = run_provision(tools, provision_copy)
    assert result.returncode != 0
    assert tools.calls() == ["vagrant up --provision K8S_NODE_LARGE=false"]
    assert not (provision_copy.parent / "ssh-config").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "provision.sh: unknown flag '--bogus'"),
        (["--large", "-x"], "provision.sh: unknown flag '-x'"),
        (["big"], "provision.sh: unexpected argument 'big'"),
    ],
)
def test_provision_usage_errors_are_one_line(
    tools: Tools, provision_copy: Path, args: list[str], message: str
):
    result = run_provision(tools, provision_copy, *args)
    assert result.returncode == 2
    assert result.stderr == f"{message}; usage: provision.sh [-l|--large] [-h|--help]\n"
    assert tools.calls() == []


def test_provision_help(tools: Tools, provision_copy: Path):
    result = run_provision(tools, provision_copy, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: provision.sh [-l|--large] [-h|--help]\n")
    assert "--large" in result.stdout and "4096" in result.stdout
    assert tools.calls() == []


@pytest.mark.parametrize("script", ["suspend.sh", "resume.sh", "destroy.sh"])
def test_the_small_helpers_reject_arguments(tools: Tools, tmp_path: Path, script: str):
    result = subprocess.run(
        ["bash", str(VAGRANT_DIR / script), "--bogus"],
        cwd=tmp_path,
        env=tools.env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr == f"{script}: unknown argument '--bogus'; usage: {script} [-h|--help]\n"
    assert tools.calls() == []
