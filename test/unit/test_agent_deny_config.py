"""The deny keys of the agent config: denyQueue (an NFQUEUE number, absent = not listening)
and denyRecordRate (denied packets recorded per second)."""

import pytest
from agentkit import config_error

from antrea_flow.exporter.config import load_agent_config


def test_defaults(write):
    config = load_agent_config(write(""))
    assert config.deny_queue is None
    assert config.deny_record_rate == 5000.0
    assert isinstance(config.deny_record_rate, float)


def test_null_is_the_same_as_absent(write):
    config = load_agent_config(write("denyQueue:\ndenyRecordRate:\n"))
    assert config.deny_queue is None
    assert config.deny_record_rate == 5000.0


@pytest.mark.parametrize("queue", [0, 1, 100, 65535])
def test_deny_queue_values(write, queue):
    assert load_agent_config(write(f"denyQueue: {queue}\n")).deny_queue == queue


@pytest.mark.parametrize("rate", [1, 5000, 200000, 10_000_000])
def test_deny_record_rate_values(write, rate):
    config = load_agent_config(write(f"denyRecordRate: {rate}\n"))
    assert config.deny_record_rate == float(rate)


@pytest.mark.parametrize(
    "text, problem",
    [
        ("denyQueue: -1", "out of range"),
        ("denyQueue: 65536", "out of range"),
        ("denyQueue: '1'", "not an integer"),
        ("denyQueue: 1.5", "not an integer"),
        ("denyQueue: true", "not an integer"),
        ("denyQueue: [1]", "not an integer"),
        ("denyRecordRate: 0", "out of range"),
        ("denyRecordRate: -5", "out of range"),
        ("denyRecordRate: 10000001", "out of range"),
        ("denyRecordRate: fast", "not an integer"),
        ("denyRecordRate: false", "not an integer"),
    ],
)
def test_bad_values_name_key_value_and_form(write, text, problem):
    message = config_error(write(text + "\n"))
    key, _, value = text.partition(": ")
    assert key in message
    assert problem in message
    assert "expected an integer in" in message
    low_high = "0..65535" if key == "denyQueue" else "1..10000000"
    assert low_high in message


def test_misspelt_key_suggests_the_right_one(write):
    message = config_error(write("denyQeue: 1\n"))
    assert "denyQeue" in message and "denyQueue" in message


def test_deny_keys_beside_the_flow_exporter_section(write):
    path = write(
        """\
        flowExporter:
          enable: true
          flowCollectorAddr: "10.0.0.1:4739:tcp"
        denyQueue: 1
        denyRecordRate: 100
        """
    )
    config = load_agent_config(path)
    assert config.flow_exporter_enabled
    assert (config.deny_queue, config.deny_record_rate) == (1, 100.0)
