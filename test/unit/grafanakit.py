"""Grafana and its ClickHouse plugin as they turn a dashboard's query into the SQL that
reaches ClickHouse: template variables as Grafana's template service replaces them, ad-hoc
filters and $__conditionalAll as the plugin's frontend applies them (src/data/adHocFilter.ts,
CHDatasource.ts applyTemplateVariables), and the macros as its backend expands them
(pkg/macros/macros.go, through sqlds' interpolate: `\\$__name\\b(?:\\((.*?)\\))?`, arguments
split on commas). Used by test_grafana_dashboards.py and test/bench/bench_clickhouse.py
(which import it as a sibling module).
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from antrea_flow.aggregator.clickhouse import Database

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = ROOT / "build" / "yamls" / "flow-visibility" / "dashboards"
CLICKHOUSE_TYPE = "grafana-clickhouse-datasource"


def dashboards() -> dict[str, dict[str, Any]]:
    """The dashboards by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def is_clickhouse(dashboard: dict[str, Any]) -> bool:
    return any(v["name"] == "clickhouse_adhoc_query" for v in dashboard["templating"]["list"])


def clickhouse_queries(by_name: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(dashboard file, what, SQL) of every panel target and variable query in ClickHouse."""
    out = []
    for name, dashboard in by_name.items():
        for variable in dashboard["templating"]["list"]:
            if variable["type"] in ("query", "constant") and is_clickhouse(dashboard):
                out.append((name, f"variable {variable['name']}", variable["query"]))
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                if target["datasource"]["type"] == CLICKHOUSE_TYPE:
                    out.append((name, f"{panel['title']} [{target['refId']}]", target["rawSql"]))
    return out


# Grafana's template variable syntax: $var, [[var:format]], ${var.field:format}.
VARIABLE = re.compile(r"\$(\w+)|\[\[(\w+?)(?::(\w+))?\]\]|\$\{(\w+)(?:\.([^:^}]+))?(?::([^}]+))?\}")


def format_value(value: str | list[str], fmt: str | None) -> str:
    """A variable's value as Grafana formats it; without a format, the ClickHouse plugin's
    own: a list as 'a','b', a single value as it is."""
    values = value if isinstance(value, list) else [value]
    if fmt is None:
        return "'" + "','".join(value) + "'" if isinstance(value, list) else value
    if fmt == "singlequote":
        return ",".join("'" + v.replace("'", "\\'") + "'" for v in values)
    if fmt == "csv":
        return ",".join(values)
    raise AssertionError(f"variable format {fmt!r}: add it to the test's expansion")


def macro_args(sql: str, start: int) -> list[str]:
    """The plugin's getMacroArgs: the arguments of the call whose '(' is at `start`, split
    at commas outside nested parentheses ([] when the call is not closed)."""
    args, depth, last = [], 0, start + 1
    for match in re.finditer(r"[(),]", sql[start:]):
        index = start + match.start()
        depth += {"(": 1, ")": -1}.get(match[0], 0)
        if match[0] == "," and depth == 1:
            args.append(sql[last:index])
            last = index + 1
        if depth == 0:
            args.append(sql[last:index])
            return args
    return []


def call_end(sql: str, start: int) -> int:
    """The index of the ')' closing the '(' at `start`."""
    return start + len(",".join(macro_args(sql, start))) + 1


@dataclass
class Request:
    """What Grafana sends with a query: the time range, the interval, the variables."""

    start: int
    end: int
    interval: int  # seconds
    current: dict[str, list[str]]  # each variable's current value, ['$__all'] for All
    options: dict[str, list[str]]  # each query variable's values
    constants: dict[str, str]
    filters: list[tuple[str, str, str]]  # ad-hoc filters: (key, operator, value)
    adhoc_table: str

    def value(self, name: str) -> str | list[str] | None:
        if name in self.constants:
            return self.constants[name]
        if name not in self.current:
            return None
        current = self.current[name]
        return self.options[name] if current == ["$__all"] else current


def apply_adhoc(sql: str, request: Request) -> str:
    """adHocFilter.ts apply: the filters as ClickHouse's additional_table_filters of the
    table of clickhouse_adhoc_query, for queries that name that table."""
    table = request.adhoc_table
    if not request.filters or not re.search(rf"\b{table}\b", sql.replace('"', ""), re.I):
        return sql
    parts = []
    for i, (key, operator, value) in enumerate(request.filters):
        key = key.split(".")[1] if "." in key else key
        operator = {"=~": "ILIKE", "!~": "NOT ILIKE"}.get(operator, operator)
        condition = "AND" if i != len(request.filters) - 1 else ""
        parts.append(f" {key} {operator} \\'{value}\\' {condition}")
    sql = sql.replace(";", "", 1)
    return f"{sql} settings additional_table_filters={{'{table}' : '{''.join(parts)}'}}"


def apply_conditional_all(sql: str, request: Request) -> str:
    """CHDatasource.applyConditionalAll: $__conditionalAll(condition, $var) is the condition,
    or 1=1 when the variable is All or empty; from the last one back."""
    macro = "$__conditionalAll("
    index = sql.rfind(macro)
    while index != -1:
        args = macro_args(sql, index + len(macro) - 1)
        if len(args) != 2:
            return sql
        name = args[1].strip()[1:]
        current = request.current.get(name)
        value = ",".join(current) if current is not None else None
        phrase = "1=1" if value in ("", "$__all") else args[0]
        sql = sql.replace(f"{macro}{args[0]},{args[1]})", phrase, 1)
        index = sql.rfind(macro)
    return sql


def replace_variables(sql: str, request: Request) -> str:
    """Grafana's templateSrv.replace: known variables only; the rest ($__timeFilter...) is
    left to the plugin's backend."""

    def replace(match: re.Match[str]) -> str:
        name = match[1] or match[2] or match[4]
        value = request.value(name)
        return match[0] if value is None else format_value(value, match[3] or match[6])

    return VARIABLE.sub(replace, sql)


def _date(seconds: int) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d")


# pkg/macros/macros.go: name -> expansion of (request, arguments).
MACROS = {
    "fromTime": lambda r, a: f"toDateTime({r.start})",
    "toTime": lambda r, a: f"toDateTime({r.end})",
    "fromTime_ms": lambda r, a: f"fromUnixTimestamp64Milli({r.start * 1000})",
    "toTime_ms": lambda r, a: f"fromUnixTimestamp64Milli({r.end * 1000})",
    "timeFilter": lambda r, a: f"{a[0]} >= toDateTime({r.start}) AND {a[0]} <= toDateTime({r.end})",
    "timeFilter_ms": lambda r, a: (
        f"{a[0]} >= fromUnixTimestamp64Milli({r.start * 1000}) AND "
        f"{a[0]} <= fromUnixTimestamp64Milli({r.end * 1000})"
    ),
    "dateFilter": lambda r, a: (
        f"{a[0]} >= toDate('{_date(r.start)}') AND {a[0]} <= toDate('{_date(r.end)}')"
    ),
    "timeInterval": lambda r, a: (
        f"toStartOfInterval(toDateTime({a[0]}), INTERVAL {max(r.interval, 1)} second)"
    ),
    "timeInterval_ms": lambda r, a: (
        f"toStartOfInterval(toDateTime64({a[0]}, 3), INTERVAL {max(r.interval, 1) * 1000} "
        "millisecond)"
    ),
    "interval_s": lambda r, a: str(max(r.interval, 1)),
}


def expand_macros(sql: str, request: Request) -> str:
    """sqlds interpolate: each macro's matches replaced, arguments split on commas."""
    for name, expand in MACROS.items():
        for match in re.findall(rf"(\$__{name}\b(?:\((.*?)\))?)", sql):
            args = [arg.strip() for arg in match[1].split(",")]
            sql = sql.replace(match[0], expand(request, args))
    return sql


def interpolate(sql: str, request: Request) -> str:
    """The SQL that reaches ClickHouse, in the plugin's order."""
    sql = apply_adhoc(sql, request)
    sql = apply_conditional_all(sql, request)
    sql = replace_variables(sql, request)
    sql = expand_macros(sql, request)
    assert "$" not in sql, f"left unexpanded:\n{sql}"
    return sql


def adhoc_table(dashboard: dict[str, Any]) -> str:
    """The plugin's getTable of clickhouse_adhoc_query: the table it selects from."""
    constant = next(v for v in dashboard["templating"]["list"] if v["type"] == "constant")
    match = re.search(r"\bFROM\s+([\w.]+)", constant["query"])
    assert match, constant["query"]
    return match[1]


def request_for(
    dashboard: dict[str, Any],
    database: Database,
    start: int,
    end: int,
    namespaces: list[str] | None = None,
    filters: list[tuple[str, str, str]] | None = None,
) -> Request:
    """The request of `dashboard` at its defaults (All namespaces, no filters) or the given
    selection: query variables resolved by running their queries, as Grafana does."""
    request = Request(start, end, 60, {}, {}, {}, filters or [], adhoc_table(dashboard))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "constant":
            request.constants[variable["name"]] = variable["query"]
        elif variable["type"] == "query":
            rows = database.rows(interpolate(variable["query"], request))
            request.options[variable["name"]] = [str(row[0]) for row in rows]
            default = variable["current"]["value"]
            request.current[variable["name"]] = (
                namespaces
                if variable["name"] == "namespace" and namespaces
                else default
                if isinstance(default, list)
                else [default]
            )
    return request


def panel_queries(database: Database, start: int, end: int) -> Iterator[tuple[str, str, str]]:
    """(dashboard title, panel title, the SQL ClickHouse gets) of every ClickHouse panel,
    for the range start..end at the dashboards' defaults."""
    for dashboard in dashboards().values():
        if not is_clickhouse(dashboard):
            continue
        request = request_for(dashboard, database, start, end)
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                if target["datasource"]["type"] == CLICKHOUSE_TYPE:
                    sql = interpolate(target["rawSql"], request)
                    yield dashboard["title"], panel["title"], sql
