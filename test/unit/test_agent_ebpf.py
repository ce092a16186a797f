"""The agent's eBPF settings (the `ebpf:` section) and what happens when the counter cannot
be loaded: one line, a metric, and the agent goes on with conntrack alone."""

from __future__ import annotations

import asyncio
import logging

import pytest
from agentkit import config_error

from antrea_flow.ebpf.counter import PacketCounter
from antrea_flow.ebpf.program import LoadError
from antrea_flow.exporter.agent import Agent
from antrea_flow.exporter.config import EbpfConfig, load_agent_config
from antrea_flow.ipfix.antrea import PACKET_DETAILS


def test_defaults_are_off_and_the_papers_sizes(write):
    config = load_agent_config(write(""))
    assert config.ebpf == EbpfConfig(False, (), 100_000, 5.0)
    assert config.host_gateway == "antrea-gw0"


def test_every_key(write):
    config = load_agent_config(
        write(
            "ebpf:\n  enable: true\n  interfaces: [eth1, veth9]\n  cacheMaxFlows: 50000\n"
            "  cacheActiveTimeout: 2s\nhostGateway: gw0\n"
        )
    )
    assert config.ebpf == EbpfConfig(True, ("eth1", "veth9"), 50_000, 2.0)
    assert config.host_gateway == "gw0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ebpf: {cacheMaxFlows: 10}",
         "ebpf.cacheMaxFlows: 10 is out of range; expected an integer in 1024..16777216"),
        ("ebpf: {cacheActiveTimeout: soon}", "ebpf.cacheActiveTimeout: 'soon' is not a duration"),
        ("ebpf: {interfaces: eth0}", "ebpf.interfaces: 'eth0' is not a list of interface names"),
        ("ebpf: {enable: yes please}", "ebpf.enable: 'yes please' is not a boolean"),
        ("ebpf: {cacheMaxFlow: 5000}",
         "unknown config key ebpf.cacheMaxFlow: 5000 (did you mean ebpf.cacheMaxFlows?)"),
    ],
)  # fmt: skip
def test_bad_values_name_the_key(write, text, expected):
    assert expected in config_error(write(text + "\n"))


def test_a_counter_that_cannot_load_is_one_line_and_a_metric(write, caplog):
    config = load_agent_config(
        write(
            "featureGates: {FlowExporter: true}\nflowCollectorAddr: 127.0.0.1:4739:tcp\n"
            "ebpf: {enable: true}\nmetricsBindAddress: ''\n"
        )  # fmt: skip
    )

    def no_bpf(max_flows: int):
        raise LoadError("not allowed to load BPF programs: the agent needs CAP_BPF")

    counter = PacketCounter(None, config.ebpf.max_flows, load_program=no_bpf)
    agent = Agent(config, "node-1", counter=counter)
    assert agent.packet_details  # the templates announce the elements, zeros if need be
    assert set(PACKET_DETAILS) <= set(agent.exporter.templates[256].keys)
    with caplog.at_level(logging.ERROR):
        asyncio.run(agent.start_counter())
    assert not agent.ebpf_loaded
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "eBPF packet counter not loaded: not allowed to load BPF programs: the agent needs "
        "CAP_BPF; counting with conntrack alone"
    ]
    assert agent.registry.get_sample_value("antrea_agent_ebpf_load_failures_total") == 1
    assert agent.registry.get_sample_value("antrea_agent_ebpf_loaded") == 0
    agent.evict_counted()  # nothing to evict, nothing fails
