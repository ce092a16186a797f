"""What the generators of build/yamls/ share (generate.py, elk.py, grafana.py): object
metadata, YAML documents as they are written, and writing the files.

The generators import it as a sibling module (each puts this folder on sys.path: build/
is not a package, as a top-level `build` would shadow the PyPI package of that name).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
YAMLS = ROOT / "build" / "yamls"


def meta(name: str, namespace: str | None, labels: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name}
    if namespace:
        out["namespace"] = namespace
    out["labels"] = dict(labels)
    return out


def workload(
    kind: str,
    metadata: dict[str, Any],
    pod_spec: dict[str, Any],
    *,
    replicas: int | None = 1,
    service_name: str | None = None,
    update_strategy: str | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A Deployment, StatefulSet or DaemonSet (`replicas=None`) of one Pod template, whose
    Pods carry the workload's labels (and `annotations`) and are selected by them."""
    labels = metadata["labels"]
    spec: dict[str, Any] = {}
    if service_name is not None:
        spec["serviceName"] = service_name
    if replicas is not None:
        spec["replicas"] = replicas
    spec["selector"] = {"matchLabels": dict(labels)}
    if update_strategy is not None:
        spec["updateStrategy"] = {"type": update_strategy}
    template_metadata: dict[str, Any] = {"labels": dict(labels)}
    if annotations:
        template_metadata["annotations"] = annotations
    spec["template"] = {"metadata": template_metadata, "spec": pod_spec}
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": metadata, "spec": spec}


class _Dumper(yaml.SafeDumper):
    pass


def _text(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # Files embedded in ConfigMaps (configs, pipelines, dashboards) stay readable:
    # multi-line strings as blocks.
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _text)


def render(header: str, objects: Sequence[dict[str, Any] | tuple[str, dict[str, Any]]]) -> str:
    """A multi-document YAML file: `header`, then each object, after its comment when it
    comes as (comment, object)."""
    documents = []
    for item in objects:
        comment, value = item if isinstance(item, tuple) else ("", item)
        lines = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
        documents.append(lines + yaml.dump(value, Dumper=_Dumper, sort_keys=False, width=100))
    return header + "---\n" + "---\n".join(documents)


def write(outputs: dict[str, str], directory: Path) -> list[Path]:
    """Each output (its path under `directory` -> its text) written; the paths."""
    written = []
    for relative, text in outputs.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
