"""The two config edits push_antrea.sh makes, done on YAML text.

- `aggregator-manifest MANIFEST [--flow-collector ADDR] [--clickhouse-url URL]` prints the
  flow aggregator's manifest with `flow-aggregator.conf` (ConfigMap flow-aggregator-configmap)
  given a `flowCollector` and/or a `clickHouse` section. The other objects are printed as
  they are in MANIFEST, text and all.
- `antrea-config [--antrea-version VERSION] [FILE]` reads the kube-system/antrea-config
  ConfigMap (as `kubectl get -o yaml` prints it; FILE or standard input) and prints it with
  the flow exporter turned on in `antrea-agent.conf`: `featureGates: {FlowExporter: true}`,
  and for Antrea v1.13 and later `flowExporter: {enable: true, flowCollectorAddr: ...}`
  (before, the flat `flowCollectorAddr` key). It keeps resourceVersion, for `kubectl replace`.

A config is edited in place where it can be, so its comments stay: a top-level key that is
absent (or only commented out) gets a block appended, a present one has its block replaced
by the merged value. The result is parsed again and must equal the intended config; where
the text defeats an in-place edit (flow style, a duplicated or quoted key), the config is
written out whole instead: values right, comments gone. Errors are one line on stderr.

Runs with PyYAML only (the repository's .venv, or python3 with python3-yaml).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import yaml

PROG = "patch_config.py"
MARK = "# Set by infra/vagrant/push_antrea.sh:\n"
AGGREGATOR_CONFIGMAP = "flow-aggregator-configmap"
AGGREGATOR_CONF_KEY = "flow-aggregator.conf"
AGENT_CONF_KEY = "antrea-agent.conf"
# Where Antrea's agents send their records: the flow aggregator's Service, over TLS.
AGGREGATOR_NAMESPACE = "flow-aggregator"
AGGREGATOR_SERVICE = "flow-aggregator"
AGGREGATOR_PORT_PROTOCOL = "4739:tls"
VERSION = re.compile(r"v?(\d+)\.(\d+)")


class PatchError(Exception):
    """Something in the input that the user has to fix; the message is one line."""


class _Quoted(str):
    """A scalar value written in double quotes, as Antrea's configs write addresses."""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks (a ConfigMap's files), _Quoted in quotes."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


def _represent_quoted(dumper: yaml.SafeDumper, data: _Quoted) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(data), style='"')


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(_Quoted, _represent_quoted)


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def _quote_strings(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _quote_strings(item) for key, item in value.items()}
    if isinstance(value, str) and "\n" not in value:
        return _Quoted(value)
    return value


def merge(base: Any, updates: dict[str, Any]) -> dict[str, Any]:
    """`base` (a mapping, or None as an empty block such as Antrea's `featureGates:` whose
    gates are all commented out) with `updates` merged in, mappings key by key."""
    merged = dict(base) if isinstance(base, dict) else {}
    for key, value in updates.items():
        if isinstance(value, dict):
            merged[key] = merge(merged.get(key), value)
        else:
            merged[key] = value
    return merged


def load_mapping(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PatchError(f"{source} is not valid YAML: {_one_line(error)}") from None
    if data is None:
        return {}  # every key commented out: all defaults
    if not isinstance(data, dict):
        raise PatchError(f"{source} is a {type(data).__name__}, expected a mapping of keys")
    return data


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _top_level_block(lines: list[str], key: str) -> tuple[int, int] | None:
    """The lines [start, end) of `key:` at column 0 and its indented continuation; None
    unless the key starts exactly one line. Comments and blank lines at column 0 after the
    block's last indented line stay outside it (they document the next key)."""
    start_pattern = re.compile(rf"{re.escape(key)}[ \t]*:(?:[ \t]|$)")
    starts = [i for i, line in enumerate(lines) if start_pattern.match(line)]
    if len(starts) != 1:
        return None
    start = starts[0]
    end = start + 1
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if not line.strip() or line.startswith("#"):
            continue  # may be inside the block, or after it
        if line[0] in " \t":
            end = i + 1
            continue
        break  # the next top-level key or a document marker
    return start, end


def _edit_in_place(
    text: str, current: dict[str, Any], expected: dict[str, Any], keys: list[str]
) -> str | None:
    lines = text.splitlines(keepends=True)
    replacements: list[tuple[int, int, str]] = []
    appended: list[str] = []
    for key in keys:
        block = dump(_quote_strings({key: expected[key]}))
        if key not in current:
            appended.append(block)
            continue
        span = _top_level_block(lines, key)
        if span is None:
            return None
        replacements.append((span[0], span[1], MARK + block))
    for start, end, block in sorted(replacements, reverse=True):
        lines[start:end] = [block]
    edited = "".join(lines)
    if appended:
        if edited and not edited.endswith("\n"):
            edited += "\n"
        edited += ("\n" if edited.strip() else "") + MARK + "".join(appended)
    return edited


def edit_config(text: str, updates: dict[str, Any], source: str) -> str:
    """`text` (a YAML config file) with `updates` merged into its top-level keys."""
    current = load_mapping(text, source)
    expected = merge(current, updates)
    edited = _edit_in_place(text, current, expected, list(updates))
    if edited is not None:
        try:
            if yaml.safe_load(edited) == expected:
                return edited
        except yaml.YAMLError:
            pass
    # The text defeats an in-place edit: write the whole config.
    whole = (
        f"# {source}, rewritten whole by infra/vagrant/push_antrea.sh (comments dropped).\n"
        + dump(_quote_strings(expected))
    )
    if yaml.safe_load(whole) != expected:
        raise PatchError(f"{source}: the edited config does not read back as intended")
    return whole


# --- flow-aggregator.yml ---------------------------------------------------------------


def aggregator_updates(flow_collector: str | None, clickhouse_url: str | None) -> dict[str, Any]:
    updates: dict[str, Any] = {}
    if flow_collector:
        updates["flowCollector"] = {"enable": True, "address": flow_collector}
    if clickhouse_url:
        updates["clickHouse"] = {"enable": True, "databaseURL": clickhouse_url}
    return updates


def _split_documents(text: str) -> list[str]:
    """The manifest's documents, each with its own `---` line and comments, as text."""
    return re.split(r"(?m)^(?=---[ \t]*$)", text)


def patch_aggregator_manifest(text: str, source: str, updates: dict[str, Any]) -> str:
    chunks = _split_documents(text)
    found = 0
    out: list[str] = []
    for chunk in chunks:
        try:
            doc = yaml.safe_load(chunk)
        except yaml.YAMLError as error:
            raise PatchError(f"{source} is not valid YAML: {_one_line(error)}") from None
        if not _is_aggregator_configmap(doc):
            out.append(chunk)
            continue
        found += 1
        if updates:
            conf = doc["data"][AGGREGATOR_CONF_KEY]
            doc["data"][AGGREGATOR_CONF_KEY] = edit_config(
                conf, updates, f"{source}: {AGGREGATOR_CONFIGMAP}/{AGGREGATOR_CONF_KEY}"
            )
            chunk = "---\n" + dump(doc)
        out.append(chunk)
    if found != 1:
        raise PatchError(
            f"{source} has {found} ConfigMaps {AGGREGATOR_CONFIGMAP} with key "
            f"{AGGREGATOR_CONF_KEY}, expected exactly one"
        )
    return "".join(out)


def _is_aggregator_configmap(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and doc.get("kind") == "ConfigMap"
        and (doc.get("metadata") or {}).get("name") == AGGREGATOR_CONFIGMAP
        and isinstance((doc.get("data") or {}).get(AGGREGATOR_CONF_KEY), str)
    )


# --- antrea-config ---------------------------------------------------------------------


def antrea_minor(version: str | None) -> tuple[int, int] | None:
    """(major, minor) of an Antrea version or image tag (v2.2.0, 2.2.0, v1.12.1-abc);
    None when it is not one (latest, a digest)."""
    match = VERSION.match(version or "")
    return (int(match[1]), int(match[2])) if match else None


def agent_updates(version: str | None) -> dict[str, Any]:
    """antrea-agent.conf's keys that turn the flow exporter on, in the form this Antrea
    version reads (the section from v1.13, the namespace/name Service form from v1.11)."""
    minor = antrea_minor(version)
    service = f"{AGGREGATOR_NAMESPACE}/{AGGREGATOR_SERVICE}:{AGGREGATOR_PORT_PROTOCOL}"
    updates: dict[str, Any] = {"featureGates": {"FlowExporter": True}}
    if minor is None or minor >= (1, 13):
        updates["flowExporter"] = {"enable": True, "flowCollectorAddr": service}
    elif minor >= (1, 11):
        updates["flowCollectorAddr"] = service
    else:
        dns = f"{AGGREGATOR_SERVICE}.{AGGREGATOR_NAMESPACE}.svc:{AGGREGATOR_PORT_PROTOCOL}"
        updates["flowCollectorAddr"] = dns
    return updates


def patch_antrea_config(text: str, source: str, version: str | None) -> str:
    configmap = load_mapping(text, source)
    data = configmap.get("data")
    if (
        configmap.get("kind") != "ConfigMap"
        or not isinstance(data, dict)
        or not isinstance(data.get(AGENT_CONF_KEY), str)
    ):
        raise PatchError(f"{source} is not a ConfigMap with key {AGENT_CONF_KEY}")
    data[AGENT_CONF_KEY] = edit_config(
        data[AGENT_CONF_KEY], agent_updates(version), f"{source}: {AGENT_CONF_KEY}"
    )
    metadata = configmap.get("metadata")
    if isinstance(metadata, dict):
        metadata.pop("managedFields", None)  # the API server keeps its own
    return dump(configmap)


# --- command line ----------------------------------------------------------------------


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError as error:
        raise PatchError(f"cannot read {path}: {error.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    aggregator = commands.add_parser("aggregator-manifest", help="patch flow-aggregator.yml")
    aggregator.add_argument("manifest")
    aggregator.add_argument("--flow-collector", metavar="ADDR")
    aggregator.add_argument("--clickhouse-url", metavar="URL")
    agent = commands.add_parser("antrea-config", help="patch kube-system/antrea-config")
    agent.add_argument("configmap", nargs="?", default="-")
    agent.add_argument("--antrea-version", metavar="VERSION")
    args = parser.parse_args(argv)
    try:
        if args.command == "aggregator-manifest":
            updates = aggregator_updates(args.flow_collector, args.clickhouse_url)
            text = patch_aggregator_manifest(_read(args.manifest), args.manifest, updates)
        else:
            source = "kube-system/antrea-config" if args.configmap == "-" else args.configmap
            if antrea_minor(args.antrea_version) is None:
                print(
                    f"{PROG}: Antrea version {args.antrea_version or '(unknown)'!s} is not "
                    "vX.Y: assuming v1.13 or later (the flowExporter section)",
                    file=sys.stderr,
                )
            text = patch_antrea_config(_read(args.configmap), source, args.antrea_version)
    except PatchError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
