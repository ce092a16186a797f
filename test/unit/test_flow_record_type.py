"""FlowRecord, the type of the records our code writes: it names exactly the elements of
the agent's and the aggregator's templates, with Python types matching theirs, and a
misspelled element name written into it is a type error (`make lint` runs mypy)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest

from antrea_flow.ipfix.antrea import (
    RECORD_ANNOTATIONS,
    FlowRecord,
    aggregator_element_names,
    exporter_element_names,
)
from antrea_flow.ipfix.elements import REGISTRY, DataType

ROOT = Path(__file__).resolve().parents[2]
_PYTHON_TYPE = {
    DataType.string: str,
    DataType.ipv4Address: str,
    DataType.ipv6Address: str,
    DataType.boolean: bool,
}


def test_flow_record_names_exactly_the_templates_elements():
    names = set(aggregator_element_names(False)) | set(aggregator_element_names(True))
    assert set(exporter_element_names(False)) <= names
    assert set(FlowRecord.__annotations__) == names | set(RECORD_ANNOTATIONS)


def test_flow_record_types_are_the_elements_types():
    hints = typing.get_type_hints(FlowRecord)
    for name, hint in hints.items():
        if name in RECORD_ANNOTATIONS:
            continue
        expected = _PYTHON_TYPE.get(REGISTRY.by_name(name).data_type, int)
        assert hint is expected, f"{name}: {hint} for {REGISTRY.by_name(name).data_type.name}"


@pytest.mark.skipif(shutil.which("mypy", path=str(Path(sys.executable).parent)) is None,
                    reason="needs mypy (make setup installs it)")  # fmt: skip
def test_a_misspelled_element_written_into_a_record_is_a_type_error(tmp_path):
    source = tmp_path / "misspelled.py"
    source.write_text(
        textwrap.dedent(
            """\
            from antrea_flow.ipfix.antrea import FlowRecord

            def fill(record: FlowRecord) -> None:
                record["sourcePodName"] = "web-1"
                record["sourcePodNmae"] = "web-1"
                record["octetDeltaCount"] = "many"
            """
        )
    )
    result = subprocess.run(
        [str(Path(sys.executable).parent / "mypy"), "--config-file", str(ROOT / "setup.cfg"),
         "--cache-dir", str(tmp_path / "cache"), str(source)],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 1, out
    assert 'has no key "sourcePodNmae"' in out and "misspelled.py:5" in out, out
    assert "misspelled.py:6" in out, out  # a str where an element is unsigned64
    assert "misspelled.py:4" not in out, out


def test_the_aggregators_identity_fields_are_the_context_and_the_cluster_ips():
    from antrea_flow.aggregator.aggregation import IDENTITY_FIELDS
    from antrea_flow.ipfix.antrea import KUBERNETES_CONTEXT_ELEMENTS

    assert (
        *KUBERNETES_CONTEXT_ELEMENTS,
        "destinationClusterIPv4",
        "destinationClusterIPv6",
    ) == IDENTITY_FIELDS
