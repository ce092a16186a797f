"""End to end: `antrea-flow quickstart`, the whole pipeline exactly as a user runs it.

The quickstart builds the lab `quickstart`, starts the aggregator (mutual TLS) and one agent
per Node as processes, runs its traffic mix and an iperf3 flow, and writes every aggregated
record the external collector received to DIR/flows.jsonl. It runs once per module (about a
minute); the tests read what it left: its output, flows.jsonl, the aggregator's JSON log and
the state of the machine afterwards.

Checks follow upstream's flow aggregator e2e test (reference/antrea.md, section 4): Pod,
Node, Service and NetworkPolicy fields of every kind of flow, both Nodes' counters of
inter-node flows, and iperf3's rate within 15% in the `throughput` of its records.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from antrea_flow.aggregator.clickhouse import Database
from antrea_flow.aggregator.config import ClickHouseConfig
from antrea_flow.lab.cluster import Cluster, load_cluster
from antrea_flow.lab.dataplane import STATE_DIR, Names
from antrea_flow.quickstart import DENIED_BY_POLICY, IPERF, LAB, traffic_mix

pytestmark = [pytest.mark.root, pytest.mark.needs("iperf3")]

DURATION = 45
# A liveness bound on the whole run: lab up, DURATION seconds of traffic, then the drain.
RUN_TIMEOUT = DURATION + 120
IPERF_RATE = 10e6  # IPERF asks for -b 10M
TOLERANCE = 0.15  # upstream's bandwidth check
ACTIONS = {"allow": 1, "drop": 2, "reject": 3}
COUNTERS = ("packet", "octet", "reversePacket", "reverseOctet")
SIDES = ("SourceNode", "DestinationNode")
EMPTY_IPS = (None, "", "0.0.0.0", "::")

CLIENT_1, CLIENT_2 = "frontend/client-1", "frontend/client-2"
WEB_1, WEB_2, DB = "backend/web-1", "backend/web-2", "backend/db"


# -- the cases ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ingress:
    name: str
    namespace: str
    type: int  # 1 K8s NetworkPolicy, 3 Antrea ClusterNetworkPolicy
    rule: str
    action: int


WEB_ALLOW = Ingress("web-allow-frontend", "backend", 1, "", ACTIONS["allow"])
DB_ALLOW = Ingress("acnp-db-guard", "", 3, "allow-web", ACTIONS["allow"])
DB_REJECT = Ingress("acnp-db-guard", "", 3, "reject-clients", ACTIONS["reject"])
ISOLATION_DROP = Ingress("", None, 1, "", ACTIONS["drop"])  # namespace: not checked


@dataclass(frozen=True)
class Case:
    """One probe of quickstart.traffic_mix and what its records must say."""

    id: str
    client: str
    target: str  # a Pod, "service" (backend/web) or "external"
    version: int
    port: int
    expect: str  # what the probe reports: ok, timeout, refused
    ingress: Ingress | None

    @property
    def pod_to_pod(self) -> bool:
        return self.target != "external"


CASES = (
    Case("intra-node", CLIENT_1, WEB_1, 4, 8080, "ok", WEB_ALLOW),
    Case("inter-node", CLIENT_1, WEB_2, 4, 8080, "ok", WEB_ALLOW),
    Case("inter-node-ipv6", CLIENT_2, WEB_1, 6, 8080, "ok", WEB_ALLOW),
    Case("service-ipv4", CLIENT_2, "service", 4, 80, "ok", WEB_ALLOW),
    Case("service-ipv6", CLIENT_1, "service", 6, 80, "ok", WEB_ALLOW),
    Case("external-ipv4", CLIENT_1, "external", 4, 8080, "ok", None),
    Case("external-ipv6", CLIENT_2, "external", 6, 8080, "ok", None),
    Case("dropped-isolation", DB, WEB_1, 4, 8080, "timeout", ISOLATION_DROP),
    Case("rejected-acnp", CLIENT_1, DB, 4, 8080, "refused", DB_REJECT),
    Case("allowed-acnp", WEB_1, DB, 4, 8080, "ok", DB_ALLOW),
)


def case_host(case: Case, cluster: Cluster) -> str:
    if case.target == "service":
        service = next(s for s in cluster.services if s.name == "web")
        return next(a for a in service.cluster_ips if (":" in a) == (case.version == 6))
    if case.target == "external":
        return cluster.external_address(case.version)
    return cluster.pod(case.target).addresses[case.version]


# -- the run ------------------------------------------------------------------------------


@dataclass
class QuickstartRun:
    output: Path
    returncode: int | None
    stdout: str
    stderr: str
    seen_pids: dict[int, int]  # each process seen, by pid: its start time (see _started)
    leftover_namespaces: list[str]
    leftover_state_dir: bool
    cluster: Cluster | None = None
    records: list[dict[str, Any]] = field(default_factory=list)  # flows.jsonl
    json_log: list[dict[str, Any]] = field(default_factory=list)  # the aggregator's own
    # While it ran, as a user in another terminal: `antrea-flow observe --verdict DROPPED
    # --verdict REJECTED -o json` against the printed URL, and the UI's page.
    observed: list[dict[str, Any]] = field(default_factory=list)
    ui_page: str = ""

    def diagnostics(self) -> str:
        logs = ""
        for path in sorted((self.output / "logs").glob("*.log")):
            logs += f"\n--- {path.name} (tail)\n{path.read_text(errors='replace')[-1500:]}"
        return f"rc={self.returncode}\n--- stderr (tail)\n{self.stderr[-3000:]}{logs}"


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("antrea-flow")
    return [str(script)] if script.exists() else [sys.executable, "-m", "antrea_flow.cli"]


def _lab_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    prefix = Names(LAB).prefix
    return sorted(line.split()[0] for line in out.splitlines() if line.startswith(prefix))


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    pending = [pid]
    while pending:
        current = pending.pop()
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                for child in map(int, children.read_text().split()):
                    if child not in out:
                        out.add(child)
                        pending.append(child)
    return out


def _netns_pids() -> set[int]:
    out: set[int] = set()
    for ns in _lab_namespaces():
        result = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        out |= {int(p) for p in result.stdout.split() if p.isdigit()}
    return out


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (the first is the state)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def _started(pid: int) -> int | None:
    """When the process started (in clock ticks since boot): with its pid, what tells it
    from a later process that got the same pid (pids wrap at 32768 here)."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def alive(pid: int, started: int) -> bool:
    """The process seen then exists and is not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in "ZX" and int(fields[19]) == started


PF_EXITING = 0x4  # /proc/PID/stat flags: in the kernel's exit path
SIGKILL_BIT = 1 << (signal.SIGKILL - 1)


def _dying(pid: int) -> bool:
    """The process is on its way out: exiting, or a SIGKILL is pending for it."""
    fields = _stat(pid)
    if fields is None:
        return False
    if int(fields[6]) & PF_EXITING:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    pending = (line.split()[1] for line in status.splitlines() if line[3:].startswith("Pnd:"))
    return any(int(mask, 16) & SIGKILL_BIT for mask in pending)


def _wait_for_the_dying(seen: dict[int, int], timeout: float = 30.0) -> None:
    """Until none of the processes seen is killed but not yet gone. A process still running
    is not waited for: the quickstart must have ended it before it exited."""
    deadline = time.monotonic() + timeout
    while any(alive(p, t) and _dying(p) for p, t in seen.items()):
        if time.monotonic() > deadline:
            return  # the test reports them
        time.sleep(0.01)


UI_URL = re.compile(r"flows in a browser: (http://\S+)/ ")


def _look_while_running(stdout: Path) -> tuple[list[dict[str, Any]], str]:
    """What `antrea-flow observe` shows of the denied flows, and the UI's page, at the URL
    the quickstart printed; nothing yet when it has printed none or no flow was denied."""
    found = UI_URL.search(stdout.read_text(errors="replace"))
    if found is None:
        return [], ""
    url = found.group(1)
    observe = subprocess.run(
        [*_cli(), "observe", "--server", url, "--verdict", "DROPPED", "--verdict", "REJECTED",
         "-o", "json", "--last", "1000"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if observe.returncode != 0:
        return [], ""
    observed = [json.loads(line) for line in observe.stdout.splitlines()]
    with urllib.request.urlopen(f"{url}/", timeout=10) as page:
        return observed, page.read().decode()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuickstartRun]:
    if _lab_namespaces():
        pytest.skip(f"a lab named {LAB!r} is up: this test would remove it")
    output = tmp_path_factory.mktemp("quickstart")
    stdout_path, stderr_path = output / "quickstart.stdout", output / "quickstart.stderr"
    seen: dict[int, int] = {}
    observed: list[dict[str, Any]] = []
    ui_page = ""
    next_look = time.monotonic() + DURATION / 2
    process = None
    try:
        with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
            process = subprocess.Popen(
                [*_cli(), "quickstart", "--duration", str(DURATION), "--output", str(output)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        deadline = time.monotonic() + RUN_TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            # Everything the quickstart started: its children, and whatever runs in the
            # lab's namespaces (the Pods' servers, the probes, iperf3).
            for pid in _descendants(process.pid) | _netns_pids():
                if pid not in seen and (started := _started(pid)) is not None:
                    seen[pid] = started
            if time.monotonic() >= next_look:  # the latest answer: it has seen the most
                next_look = time.monotonic() + 5
                looked, page = _look_while_running(stdout_path)
                if looked:
                    observed, ui_page = looked, page
            time.sleep(0.5)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # as a user's Ctrl-C: it cleans up
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _wait_for_the_dying(seen)
        run = QuickstartRun(
            output=output,
            returncode=process.returncode,
            stdout=stdout_path.read_text(errors="replace"),
            stderr=stderr_path.read_text(errors="replace"),
            seen_pids={p: t for p, t in seen.items() if p not in (process.pid, os.getpid())},
            leftover_namespaces=_lab_namespaces(),
            leftover_state_dir=(STATE_DIR / LAB).exists(),
            observed=observed,
            ui_page=ui_page,
        )
        inventory = output / "inventory.yaml"
        if inventory.exists():
            run.cluster = load_cluster(str(inventory))
        run.records = _read_jsonl(output / "flows.jsonl")
        run.json_log = _read_jsonl(output / "aggregator-flows.jsonl")
        yield run
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        # Whatever happened, the lab goes (the quickstart may have been killed).
        subprocess.run(
            [*_cli(), "lab", "down", "--name", LAB],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=120,
            check=False,
        )


@pytest.fixture(scope="module")
def ran(quickstart: QuickstartRun) -> QuickstartRun:
    """The run, which must have produced records to check."""
    assert quickstart.returncode == 0, quickstart.diagnostics()
    assert quickstart.cluster is not None, "no inventory.yaml"
    assert quickstart.records, "flows.jsonl is empty"
    return quickstart


# -- reading records ----------------------------------------------------------------------


def ip(record: dict[str, Any], end: str) -> str | None:
    return record.get(f"{end}IPv4Address") or record.get(f"{end}IPv6Address")


def cluster_ip(record: dict[str, Any]) -> str | None:
    value = record.get("destinationClusterIPv4") or record.get("destinationClusterIPv6")
    return None if value in EMPTY_IPS else value


def connection(record: dict[str, Any]) -> tuple:
    return (
        ip(record, "source"),
        ip(record, "destination"),
        record.get("protocolIdentifier"),
        record.get("sourceTransportPort"),
        record.get("destinationTransportPort"),
    )


def identity(record: dict[str, Any]) -> tuple:
    """What tells one exported record from another: its connection, end and counters."""
    return (
        *connection(record),
        record.get("flowEndSeconds"),
        record.get("flowEndReason"),
        record.get("octetDeltaCount"),
        record.get("packetDeltaCount"),
        record.get("octetTotalCount"),
    )


def connections(records: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Records by connection, each connection's in export order (flowEndSeconds, then the
    order they arrived in). A record whose first packet came after the previous record's
    last is a new connection on that 5-tuple (untracked traffic, counted by the eBPF path,
    is a connection until it is idle): the key's last item numbers them."""
    by_tuple: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_tuple[connection(record)].append(record)
    out: dict[tuple, list[dict[str, Any]]] = {}
    for key, group in by_tuple.items():
        group.sort(key=lambda r: r.get("flowEndSeconds", 0))  # stable: arrival order kept
        number = 0
        for previous, record in zip([None, *group], group, strict=False):
            if (
                previous is not None
                and record["flowStartMilliseconds"] > previous["flowEndMilliseconds"]
            ):
                number += 1
            out.setdefault((*key, number), []).append(record)
    return out


def case_records(case: Case, cluster: Cluster, records: list[dict]) -> list[dict]:
    source = cluster.pod(case.client).addresses[case.version]
    host = case_host(case, cluster)
    out = []
    for record in records:
        if ip(record, "source") != source or record.get("protocolIdentifier") != 6:
            continue
        if case.target == "service":
            if cluster_ip(record) == host and record.get("destinationServicePort") == case.port:
                out.append(record)
        elif (
            ip(record, "destination") == host
            and record.get("destinationTransportPort") == case.port
            and cluster_ip(record) is None
        ):
            out.append(record)
    return out


def pod_of(cluster: Cluster, address: str | None):
    for pod in cluster.pods:
        if address in pod.addresses.values():
            return pod
    return None


# -- the run as a whole -------------------------------------------------------------------


def test_quickstart_exits_0_and_prints_the_table_and_summary(quickstart: QuickstartRun):
    run = quickstart
    assert run.returncode == 0, run.diagnostics()
    lines = run.stdout.splitlines()
    header = next((line for line in lines if line.startswith("TIME ")), None)
    assert header is not None, f"no table header in:\n{run.stdout[:3000]}"
    columns = ["TIME", "SOURCE", "DESTINATION", "SERVICE", "PROTO", "BYTES", "MBIT/S"]
    columns += ["INGRESS POLICY", "TYPE"]
    positions = [header.find(column) for column in columns]
    assert -1 not in positions and positions == sorted(positions), header
    summary = [
        m for line in lines if (m := re.match(r"^(\d+) aggregated records in (\S+) \((\d+) ", line))
    ]
    assert len(summary) == 1, run.stdout[-3000:]
    assert int(summary[0].group(1)) == len(run.records)
    assert f"in {run.output / 'flows.jsonl'}" in summary[0].string
    assert re.search(r"iperf3 reports [\d.]+ Mbit/s", run.stdout), run.stdout[-3000:]


def test_quickstart_leaves_no_namespace_process_or_state(quickstart: QuickstartRun):
    run = quickstart
    assert not run.leftover_namespaces, f"namespaces left: {run.leftover_namespaces}"
    assert not run.leftover_state_dir, f"{STATE_DIR / LAB} left behind"
    assert run.seen_pids, "no process of the quickstart was ever seen (the check is blind)"
    survivors = {}
    for pid, started in sorted(run.seen_pids.items()):
        if alive(pid, started):
            with contextlib.suppress(OSError):
                survivors[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    assert not survivors, f"processes the quickstart started still run: {survivors}"


def test_every_probe_reports_what_its_policy_decides(ran: QuickstartRun):
    """The summary lists each probe of the traffic mix with what it saw last."""
    summary = ran.stdout.rpartition(" exported incomplete")[2]
    seen = {
        m.group(1).strip(): m.group(2).strip()
        for m in re.finditer(r"^  (.{45}) (\S.*)$", summary, re.M)
    }
    outcomes = {p.what: (seen.get(p.what, "missing"), p.expect) for p in traffic_mix(ran.cluster)}
    wrong = {what: got for what, got in outcomes.items() if got[0] != got[1]}
    assert not wrong, f"(seen, expected) per probe: {wrong}"


def test_the_traffic_mix_is_what_these_tests_check(ran: QuickstartRun):
    mix = {(p.pod, p.host, p.port, p.expect) for p in traffic_mix(ran.cluster)}
    cases = {(c.client, case_host(c, ran.cluster), c.port, c.expect) for c in CASES}
    assert mix == cases
    # The inventory the agents read gives the Pods the addresses the lab gave them.
    inventory = yaml.safe_load((ran.output / "inventory.yaml").read_text())
    for item in inventory["items"]:
        if item["kind"] == "Pod":
            pod = ran.cluster.pod(f"{item['metadata']['namespace']}/{item['metadata']['name']}")
            ips = [entry["ip"] for entry in item["status"]["podIPs"]]
            assert ips == [pod.addresses[4], pod.addresses[6]]


# -- each case of the traffic mix ---------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_records_of_each_case(ran: QuickstartRun, case: Case):
    cluster = ran.cluster
    records = case_records(case, cluster, ran.records)
    assert records, f"no record of {case.id} among {len(ran.records)} records"
    client = cluster.pod(case.client)
    problems: list[str] = []

    def check(record: dict[str, Any], key: str, expected: Any) -> None:
        if record.get(key) != expected:
            problems.append(f"{connection(record)} {key}={record.get(key)!r}, not {expected!r}")

    for record in records:
        check(record, "sourcePodName", client.name)
        check(record, "sourcePodNamespace", client.namespace)
        check(record, "sourceNodeName", client.node.name)
        check(record, "egressNetworkPolicyRuleAction", 0)
        if case.pod_to_pod:
            server = pod_of(cluster, ip(record, "destination"))
            if case.target == "service":
                assert server is not None and server.key in (WEB_1, WEB_2), record
            else:
                assert server is cluster.pod(case.target), record
            check(record, "destinationPodName", server.name)
            check(record, "destinationPodNamespace", server.namespace)
            check(record, "destinationNodeName", server.node.name)
            check(record, "flowType", 1 if server.node is client.node else 2)
            check(record, "destinationTransportPort", 8080)
        else:
            check(record, "destinationPodName", "")
            check(record, "destinationNodeName", "")
            check(record, "flowType", 3)
        if case.target == "service":
            family = "IPv4" if case.version == 4 else "IPv6"
            check(record, f"destinationCluster{family}", case_host(case, cluster))
            check(record, "destinationServicePort", 80)
            check(record, "destinationServicePortName", "backend/web:http")
        else:
            check(record, "destinationServicePortName", "")
        ingress = case.ingress
        if ingress is None:
            check(record, "ingressNetworkPolicyRuleAction", 0)
            check(record, "ingressNetworkPolicyName", "")
        else:
            check(record, "ingressNetworkPolicyName", ingress.name)
            check(record, "ingressNetworkPolicyType", ingress.type)
            check(record, "ingressNetworkPolicyRuleName", ingress.rule)
            check(record, "ingressNetworkPolicyRuleAction", ingress.action)
            if ingress.namespace is not None:
                check(record, "ingressNetworkPolicyNamespace", ingress.namespace)
    assert not problems, f"{len(problems)} wrong fields, e.g.:\n" + "\n".join(problems[:15])


@pytest.mark.parametrize("case", [c for c in CASES if c.pod_to_pod], ids=lambda c: c.id)
def test_pod_to_pod_records_are_complete(ran: QuickstartRun, case: Case):
    """Both Pods, both Nodes, and (in the aggregator's JSON log, which carries the flag) not
    incomplete: the aggregator joined both Nodes' halves of every connection."""
    cluster = ran.cluster
    incomplete = []
    for record in case_records(case, cluster, ran.records):
        for key in ("PodName", "PodNamespace", "NodeName"):
            for end in ("source", "destination"):
                if not record.get(end + key):
                    incomplete.append((connection(record), end + key))
        if record.get("incomplete"):
            incomplete.append((connection(record), "incomplete"))
    logged = case_records(case, cluster, ran.json_log)
    assert logged, f"no record of {case.id} in the aggregator's JSON log"
    incomplete += [
        (connection(r), "incomplete") for r in logged if r.get("incomplete") is not False
    ]
    assert not incomplete, f"incomplete records of {case.id}: {incomplete[:10]}"


# -- counters -----------------------------------------------------------------------------


def test_inter_node_records_carry_both_nodes_counters(ran: QuickstartRun):
    problems = []
    inter = [r for r in ran.records if r.get("flowType") == 2]
    assert inter, "no inter-node record"
    for record in inter:
        missing = [
            f"{name}{kind}CountFrom{side}"
            for name in COUNTERS
            for kind in ("Total", "Delta")
            for side in SIDES
            if f"{name}{kind}CountFrom{side}" not in record
        ]
        if missing:
            problems.append((connection(record), "missing", missing))
    # Where both Nodes forward the packets (allowed flows, and the SYNs the destination
    # drops), each Node's final totals count them.
    both = [c for c in CASES if c.ingress in (WEB_ALLOW, DB_ALLOW, ISOLATION_DROP)]
    for case in both:
        records = [r for r in case_records(case, ran.cluster, ran.records) if r["flowType"] == 2]
        for key, group in connections(records).items():
            last = group[-1]
            for side in SIDES:
                if not last.get(f"packetTotalCountFrom{side}"):
                    problems.append((case.id, key, f"no packets from the {side}"))
    # A rejected connection is known to its destination Node at least.
    rejected = next(c for c in CASES if c.ingress == DB_REJECT)
    for record in case_records(rejected, ran.cluster, ran.records):
        if not record.get("packetTotalCountFromDestinationNode"):
            problems.append((rejected.id, connection(record), "no packets from the destination"))
    assert not problems, f"{len(problems)} problems, e.g.: {problems[:10]}"


def test_deltas_of_each_connection_add_up_to_its_totals(ran: QuickstartRun):
    """Summing a connection's exported deltas gives its final totals: common counters, and
    each Node's own."""
    problems = []
    for key, group in connections(ran.records).items():
        last = group[-1]
        names = [f"{n}{{}}Count" for n in COUNTERS]
        names += [f"{n}{{}}CountFrom{side}" for n in COUNTERS for side in SIDES]
        for name in names:
            deltas = sum(r.get(name.format("Delta"), 0) for r in group)
            total = max(r.get(name.format("Total"), 0) for r in group)
            if deltas != total or last.get(name.format("Total"), 0) != total:
                problems.append(
                    (key, name.format("Delta"), [r.get(name.format("Delta")) for r in group], total)
                )
    assert not problems, f"{len(problems)} mismatches, e.g.:\n" + "\n".join(map(str, problems[:10]))


def test_aggregator_exports_reach_the_collector_unchanged(ran: QuickstartRun):
    """What the external collector got over IPFIX is what the aggregator exported (its JSON
    log), record for record; and the summary's count of incomplete records is the log's."""

    collected = sorted(map(identity, ran.records), key=repr)
    logged = sorted(map(identity, ran.json_log), key=repr)
    assert collected == logged
    incomplete = sum(1 for r in ran.json_log if r.get("incomplete"))
    match = re.search(
        r"^\d+ aggregated records in \S+ \((\d+) exported incomplete", ran.stdout, re.M
    )
    assert match is not None and int(match.group(1)) == incomplete, (
        f"the summary says {match and match.group(1)} incomplete, the aggregator's log {incomplete}"
    )


# -- seen while it runs ------------------------------------------------------------------


def test_observe_shows_the_denied_flows_while_the_quickstart_runs(ran: QuickstartRun):
    """A new user's second terminal: `antrea-flow observe --verdict DROPPED` (and REJECTED)
    at the URL the quickstart printed answers with the denied connections, and nothing else;
    the same address serves the UI."""
    assert ran.observed, f"observe showed no denied flow during the run\n{ran.stdout[-2000:]}"
    pairs = set()
    for r in ran.observed:
        actions = {r["ingressNetworkPolicyRuleAction"], r["egressNetworkPolicyRuleAction"]}
        assert actions & {ACTIONS["drop"], ACTIONS["reject"]}, r
        pairs.add((f"{r['sourcePodNamespace']}/{r['sourcePodName']}",
                   f"{r['destinationPodNamespace']}/{r['destinationPodName']}"))  # fmt: skip
    denied = {(c.client, c.target) for c in CASES if c.ingress in (ISOLATION_DROP, DB_REJECT)}
    assert pairs == denied
    assert "<title>antrea-flow</title>" in ran.ui_page


# -- ClickHouse ---------------------------------------------------------------------------


def test_the_embedded_clickhouse_holds_every_exported_record(ran: QuickstartRun):
    """The aggregator wrote what it exported to ClickHouse (embedded), each record once,
    with its values; and the summary answers from it."""
    config = ClickHouseConfig(url=(ran.output / "clickhouse").as_uri())
    database = Database(config)
    database.connect()
    try:
        stored = database.rows(
            "SELECT sourceIP, destinationIP, protocolIdentifier, sourceTransportPort, "
            "destinationTransportPort, toUnixTimestamp(flowEndSeconds), flowEndReason, "
            "octetDeltaCount, packetDeltaCount, octetTotalCount FROM default.flows"
        )
        denied = database.rows(DENIED_BY_POLICY)
    finally:
        database.close()

    assert sorted(stored, key=repr) == sorted(map(identity, ran.json_log), key=repr)
    match = re.search(r"^ClickHouse \(embedded, \S+\): (\d+) records", ran.stdout, re.M)
    assert match is not None and int(match.group(1)) == len(ran.json_log), ran.stdout
    # The denied connections by policy: the Reject rule and the isolation's drops, each
    # with as many connections as the records hold.
    by_policy = {(policy, action): count for policy, action, count in denied}
    reject = next(c for c in CASES if c.ingress == DB_REJECT)
    rejected = {connection(r) for r in case_records(reject, ran.cluster, ran.json_log)}
    key = (f"{DB_REJECT.name} {DB_REJECT.rule}", ACTIONS["reject"])
    assert by_policy.get(key) == len(rejected), by_policy
    assert by_policy.get(("(isolated: no rule allows it)", ACTIONS["drop"]), 0) > 0, by_policy
    for (policy, action), count in by_policy.items():
        name = {2: "drop", 3: "reject"}[action]
        assert re.search(
            rf"^    {re.escape(policy)}\s+{name}\s+{count} connections", ran.stdout, re.M
        )


# -- iperf3 -------------------------------------------------------------------------------


def _iperf_connection(run: QuickstartRun) -> list[dict[str, Any]]:
    client, server, port = run.cluster.pod(IPERF[0]), run.cluster.pod(IPERF[1]), IPERF[2]
    records = [
        r
        for r in run.records
        if ip(r, "source") == client.addresses[4]
        and ip(r, "destination") == server.addresses[4]
        and r.get("destinationTransportPort") == port
    ]
    assert records, f"no record of iperf3 {IPERF[0]} -> {IPERF[1]}:{port}"
    groups = connections(records)
    # The data connection, not iperf3's control connection: the one that carried the most.
    return max(groups.values(), key=lambda g: max(r["octetTotalCount"] for r in g))


def test_iperf3_throughput_within_15_percent(ran: QuickstartRun):
    group = _iperf_connection(ran)
    first = group[0]
    assert first["sourcePodName"] == "client-1" and first["destinationPodName"] == "web-2"
    assert first["flowType"] == 2
    assert first["ingressNetworkPolicyName"] == "web-allow-frontend"
    # Upstream's check: the throughput of the records exported on active timeout.
    active = [r for r in group if r.get("flowEndReason") == 2 and r.get("throughput")]
    assert active, f"no active-timeout record with a throughput: {[_brief(r) for r in group]}"
    # Both ends of a record's window are whole seconds (IPFIX flowStart/EndSeconds), so a
    # window of w seconds may stand for up to w + 1 of traffic: the rate it gives may be off
    # by a second's worth on top of the tolerance (a 5 s window: 20%).
    previous_end = {id(r): p["flowEndSeconds"] for p, r in zip(group, group[1:], strict=False)}
    for record in active:
        rate = record["throughput"]
        window = record["flowEndSeconds"] - previous_end.get(id(record), record["flowStartSeconds"])
        slack = IPERF_RATE / max(window, 1)
        assert abs(rate - IPERF_RATE) <= TOLERANCE * IPERF_RATE + slack, (
            f"throughput {rate / 1e6:.2f} Mbit/s, iperf3 was asked for "
            f"{IPERF_RATE / 1e6:.0f}: {[_brief(r) for r in group]}"
        )
    # And the whole flow: its final total over iperf3's 12 s against what iperf3 measured.
    match = re.search(r"iperf3 reports ([\d.]+) Mbit/s", ran.stdout)
    assert match, ran.stdout[-2000:]
    reported = float(match.group(1)) * 1e6
    total = max(r["octetTotalCount"] for r in group)
    measured = total * 8 / IPERF[4]
    assert abs(measured - reported) <= TOLERANCE * reported, (
        f"{total} octets in {IPERF[4]} s = {measured / 1e6:.2f} Mbit/s; iperf3 reports "
        f"{reported / 1e6:.2f}"
    )


def _brief(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("flowStartSeconds", "flowEndSeconds", "flowEndReason", "octetDeltaCount")
    keys += ("octetTotalCount", "throughput", "throughputFromSourceNode")
    return {k: record.get(k) for k in keys}
