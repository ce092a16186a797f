"""What the exporter does with a record it cannot encode: drops it, counts it, logs it once,
and keeps going."""

from __future__ import annotations

import logging

from antrea_flow.ipfix import antrea
from antrea_flow.ipfix.address import TransportAddress
from antrea_flow.ipfix.exporting import ExportingProcess

V4 = antrea.EXPORTER_TEMPLATE_ID_IPV4


def test_a_value_out_of_its_fields_range_is_dropped_and_counted(caplog):
    exporter = ExportingProcess(
        TransportAddress("127.0.0.1", 4739, "tcp"), antrea.exporter_templates(), 1
    )
    template = exporter.templates[V4]
    # A port does not fit unsigned16: struct.pack refuses it with struct.error.
    values = template.values_from({"sourceTransportPort": 70000})
    with caplog.at_level(logging.DEBUG, logger="antrea_flow.ipfix.exporting"):
        assert exporter.add(V4, values) is False
        assert exporter.stats.records_dropped == {"encode_error": 1}
        assert exporter.add_mapping(V4, {"sourceTransportPort": 65536}) is False
    assert exporter.stats.records_dropped == {"encode_error": 2}
    assert exporter.queued == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, "logged once per template"
    assert "sourceTransportPort=70000" in errors[0].getMessage()
