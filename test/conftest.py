"""Shared test set-up: automatic skips (root, eBPF, external binaries) and TLS material."""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from antrea_flow.tls import CertificateAuthority, write_pem_files


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs(*binaries): needs these programs on PATH (skipped otherwise)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    is_root = os.geteuid() == 0
    for item in items:
        if item.get_closest_marker("root") is not None and not is_root:
            item.add_marker(pytest.mark.skip(reason="needs root (run the tests as root)"))
        if item.get_closest_marker("ebpf") is not None:
            if not is_root:
                item.add_marker(pytest.mark.skip(reason="needs root to load BPF programs"))
            elif importlib.util.find_spec("bcc") is None:
                item.add_marker(
                    pytest.mark.skip(reason="needs bcc (apt-get install python3-bpfcc)")
                )
        for marker in item.iter_markers("needs"):
            missing = [name for name in marker.args if shutil.which(name) is None]
            if missing:
                item.add_marker(
                    pytest.mark.skip(
                        reason=f"needs {', '.join(missing)} on PATH (apt-get install "
                        f"{' '.join(_package(m) for m in missing)})"
                    )
                )


def _package(binary: str) -> str:
    return {"dumpcap": "wireshark-common", "chromedriver": "chromium-driver"}.get(binary, binary)


@dataclass(frozen=True)
class CertFiles:
    """ca.crt / tls.crt / tls.key of one party."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class TLSMaterial:
    """A CA with a server certificate (localhost, 127.0.0.1, ::1) and a client certificate,
    and an unrelated CA with its own client certificate for negative tests."""

    server: CertFiles
    client: CertFiles
    # Signed by the unrelated CA; its `ca` is that CA. An exporter using it still verifies
    # the collector with `server.ca`, so only the collector has a reason to refuse it.
    rogue_client: CertFiles
    directory: Path
    ca: CertificateAuthority  # to issue more certificates in a test


@pytest.fixture
def tls_material(tmp_path: Path) -> TLSMaterial:
    base = tmp_path / "tls"
    ca = CertificateAuthority.create("antrea-flow-test-ca")
    server = ca.issue(
        "flow-aggregator",
        dns_names=["localhost", "flow-aggregator.flow-aggregator.svc"],
        ip_addresses=["127.0.0.1", "::1"],
        server=True,
    )
    client = ca.issue("node-1", client=True)
    other_ca = CertificateAuthority.create("unrelated-ca")
    rogue = other_ca.issue("intruder", dns_names=["localhost"], client=True)
    return TLSMaterial(
        server=CertFiles(*write_pem_files(base / "server", ca, server)),
        client=CertFiles(*write_pem_files(base / "client", ca, client)),
        rogue_client=CertFiles(*write_pem_files(base / "rogue", other_ca, rogue)),
        directory=base,
        ca=ca,
    )
