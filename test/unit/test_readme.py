"""The README's module table lists every module of antrea_flow, and only those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_module_table_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| module | job |") :].split("\n\n", 1)[0]
    listed = set(re.findall(r"^\| `(antrea_flow/[\w/]+\.py)` \|", table, re.M))
    modules = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "antrea_flow").rglob("*.py")
        if p.name != "__init__.py"
    }
    assert modules - listed == set(), "modules missing from the README's table"
    assert listed - modules == set(), "the README's table lists modules that do not exist"
