"""Coverage-guided fuzzing of the config loaders, with atheris.

An input is a config file's bytes; both `load_agent_config` and `load_aggregator_config`
read it, and may only refuse it with a ConfigError or UsageError (one line naming the key,
the value and the accepted form), never another exception.

Byte-level mutation mostly breaks YAML, so half the mutations are YAML-aware: an input
that parses as a mapping gets a known key set to a value of another kind, a key dropped,
renamed into a near miss or moved into a section, and is written back as YAML. The corpus
seeds it with real antrea-agent.conf and flow-aggregator.conf files.

    python test/fuzz/fuzz_config.py [libFuzzer flags] CORPUS_DIR
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from typing import Any

import atheris
import fuzzkit
import yaml

with atheris.instrument_imports(include=["antrea_flow"]):
    from antrea_flow.aggregator.config import load_aggregator_config
    from antrea_flow.errors import UsageError
    from antrea_flow.exporter.config import load_agent_config

# Keys the loaders read (README's antrea-agent.conf and flow-aggregator.conf tables), the
# sections they nest in, and a few of the Antrea keys they accept and ignore.
KEYS = (
    "featureGates",
    "FlowExporter",
    "flowExporter",
    "enable",
    "flowCollectorAddr",
    "flowPollInterval",
    "activeFlowExportTimeout",
    "idleFlowExportTimeout",
    "conntrackZone",
    "inventoryFile",
    "tlsCertDir",
    "metricsBindAddress",
    "protocolFilter",
    "denyQueue",
    "denyRecordRate",
    "exportReplayWindow",
    "stateDir",
    "externalFlowCollectorAddr",
    "flowExportInterval",
    "activeFlowRecordTimeout",
    "aggregatorTransportProtocol",
    "flowAggregatorAddress",
    "inactiveFlowRecordTimeout",
    "correlationTimeout",
    "listenAddress",
    "certDir",
    "jsonLogPath",
    "observationDomainID",
    "templateRefreshTimeout",
    "flowCollector",
    "address",
    "maxIPFIXMsgSize",
    "recordFormat",
    "tls",
    "includeK8sNames",
    "includeK8sUIDs",
    "collectorLimits",
    "maxSessions",
    "maxSessionsPerAddress",
    "firstMessageTimeout",
    "idleTimeout",
    "maxTemplateFields",
    "maxTemplatesPerDomain",
    "maxDomainsPerSession",
    "maxTemplateMemoryPerSession",
    "maxTemplateMemory",
    "mode",
    "clickHouse",
    "recordContents",
    "ovsBridge",
    "antreaProxy",
)
# Values at and around what the loaders accept: durations, integers at the edges of their
# ranges, addresses in each form, protocols, and values of the wrong kind.
VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    1,
    -1,
    511,
    512,
    65535,
    65536,
    0xFFFFFFFF,
    1 << 32,
    1 << 40,
    (1 << 40) + 1,
    1.5,
    float("nan"),
    float("inf"),
    "",
    "0",
    "5s",
    "1m30s",
    "500ms",
    "1.5h",
    "-1s",
    ".5s",
    "1µs",
    "999999999h",
    "0.0000000001s",
    "tcp",
    "udp",
    "tls",
    "TLS",
    "sctp",
    "IPFIX",
    ":4739",
    "[::]:4739",
    "0.0.0.0:0",
    "127.0.0.1:9100",
    "10.0.0.9:4739:udp",
    "[fd00::1]:4739:tcp",
    "fd00::1",
    "[fd00::1]",
    "flow-aggregator/flow-aggregator",
    "flow-aggregator.flow-aggregator.svc:4739:tls",
    "host:1:tcp:extra",
    "[fd00::1",
    "a..b:4739",
    "/tmp/x",
    [],
    ["tcp", "udp"],
    ["TCP", "bogus"],
    [1, 2],
    {},
    {"enable": True},
    {"enable": True, "address": "10.0.0.9:4739:udp"},
)

_SECTIONS = ("featureGates", "flowExporter", "flowCollector", "collectorLimits", "tls")


def _mappings(node: Any) -> list[dict]:
    """Every mapping in a parsed document, the root first; each once: YAML aliases make a
    graph, in which a few hundred bytes reach 10**9 items."""
    found = []
    stack = [node]
    seen: set[int] = set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            found.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _near_miss(key: str, rng: random.Random) -> str:
    if len(key) < 2:
        return key + "x"
    i = rng.randrange(len(key) - 1)
    return key[:i] + key[i + 1] + key[i] + key[i + 2 :]  # two letters swapped


def _edit(doc: dict, rng: random.Random) -> None:
    target = rng.choice(_mappings(doc))
    choice = rng.randrange(5)
    keys = list(target)
    if choice == 0 or not keys:
        target[rng.choice(KEYS)] = rng.choice(VALUES)
    elif choice == 1:
        target[rng.choice(keys)] = rng.choice(VALUES)
    elif choice == 2:
        del target[rng.choice(keys)]
    elif choice == 3:
        key = rng.choice(keys)
        target[_near_miss(str(key), rng)] = target.pop(key)
    else:
        key = rng.choice(keys)
        section = doc.setdefault(rng.choice(_SECTIONS), {})
        if isinstance(section, dict) and section is not target:
            section[key] = target.pop(key)


def mutate(data: bytes, max_size: int, seed: int) -> bytes:
    """libFuzzer's mutation, or (half the time) a YAML-aware one."""
    rng = random.Random(seed)
    if rng.random() < 0.5:
        return atheris.Mutate(data, max_size)
    # Whatever the input, mutating it must not fail: the loaders are what is under test,
    # and PyYAML raises more than YAMLError on odd input (RecursionError, ValueError, ...).
    try:
        doc = yaml.safe_load(data)
        if not isinstance(doc, dict):
            doc = {}
        for _ in range(rng.randint(1, 3)):
            _edit(doc, rng)
        flow = rng.random() < 0.2
        out = yaml.safe_dump(doc, default_flow_style=flow, sort_keys=False).encode()
    except Exception:
        return atheris.Mutate(data, max_size)
    return out if len(out) <= max_size else atheris.Mutate(data, max_size)


# The loaders take a path: one unlinked file for the life of the process, named through
# /proc so that nothing is left behind however libFuzzer ends the process.
_FD, _unlinked = tempfile.mkstemp(prefix="antrea-flow-fuzz-", suffix=".conf")
os.unlink(_unlinked)
PATH = f"/proc/self/fd/{_FD}"


def test_one_input(data: bytes) -> None:
    os.ftruncate(_FD, 0)
    os.pwrite(_FD, data, 0)
    for load in (load_agent_config, load_aggregator_config):
        # A UsageError (ConfigError is one) is the only way to refuse a file.
        with contextlib.suppress(UsageError):
            load(PATH)


if __name__ == "__main__":
    fuzzkit.run("config", test_one_input, mutate)
