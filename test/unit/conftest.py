"""Fixtures shared by the unit tests (plain builders live in agentkit.py)."""

import textwrap

import pytest


@pytest.fixture
def write(tmp_path):
    """write(text, name="antrea-agent.conf"): `text`, dedented, as a file in tmp_path; its
    path."""

    def write(text, name="antrea-agent.conf"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write
