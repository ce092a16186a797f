"""Reading YAML config files with errors that name the key, the value and the accepted form."""

from __future__ import annotations

import difflib
import os
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from .durations import ACCEPTED_FORM as DURATION_FORM
from .durations import format_duration, parse_duration
from .errors import UsageError
from .ipfix.address import AddressError, TransportAddress, parse_address


class ConfigError(UsageError):
    pass


_SHOWN = 120  # characters of a value quoted in an error


def cut(text: str, limit: int = _SHOWN) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxdict, short.maxlist, short.maxtuple = 3, 6, 6, 6
    short.maxstring = short.maxother = short.maxlong = _SHOWN
    return short


_REPR = _short_repr()


def shown(value: Any) -> str:
    """`value` as an error quotes it: a repr bounded in depth and length, never built
    whole (a value can be a megabyte, or YAML aliases nesting 10**9 items in 300 bytes)."""
    try:
        return cut(_REPR.repr(value))
    except ValueError:  # an integer of more than 4300 digits
        return f"<an integer of {value.bit_length()} bits>"


def load_yaml(path: str | os.PathLike, what: str) -> Any:
    """The YAML document in `path`; a ConfigError that says what is wrong with the file."""
    return _parse_yaml(path, what, yaml.safe_load)


def load_yaml_documents(path: str | os.PathLike, what: str) -> list[Any]:
    """Every YAML document in `path` (for files of several `---` documents)."""
    return _parse_yaml(path, what, lambda data: list(yaml.safe_load_all(data)))


def _parse_yaml(path: str | os.PathLike, what: str, parse) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        # From bytes: YAML reads the encoding mark itself, and bytes that are not UTF-8 (or
        # UTF-16) are its ReaderError, not a UnicodeDecodeError.
        return parse(data)
    except yaml.YAMLError as exc:
        one_line = " ".join(str(exc).split())  # YAML's messages span lines; ours do not
        raise ConfigError(f"{path}: not valid YAML: {cut(one_line, 400)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None


class ConfigReader:
    """Typed access to one mapping of a config file; every error names file and key."""

    def __init__(self, source: str, values: Mapping[str, Any], prefix: str = ""):
        self.source = source
        self.values = values
        self.prefix = prefix
        self.used: set[str] = set()  # keys read
        self.ignored: set[str] = set()  # keys accepted without being read

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ConfigReader:
        data = load_yaml(path, "config file")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path}: expected a mapping of config keys, got {type(data).__name__}"
            )
        return cls(str(path), data)

    def error(self, key: str, value: Any, problem: str, form: str) -> ConfigError:
        return ConfigError(
            f"{self.source}: {self.prefix}{key}: {shown(value)} {problem}; expected {form}"
        )

    def _raw(self, key: str) -> tuple[bool, Any]:
        self.used.add(key)
        if key in self.values and self.values[key] is not None:
            return True, self.values[key]
        return False, None

    def duration(self, key: str, default: float, minimum: float | None = None) -> float:
        present, value = self._raw(key)
        if not present:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise self.error(key, value, "is not a duration", DURATION_FORM) from None
        if minimum is not None and seconds < minimum:
            form = f"at least {format_duration(minimum)} ({DURATION_FORM})"
            raise self.error(key, value, "is too short", form)
        return seconds

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        present, value = self._raw(key)
        if not present:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, value, "is not an integer", f"an integer in {low}..{high}")
        if not low <= value <= high:
            raise self.error(key, value, "is out of range", f"an integer in {low}..{high}")
        return value

    def string(self, key: str, default: str, form: str = "a string") -> str:
        present, value = self._raw(key)
        if not present:
            return default
        if not isinstance(value, str):
            raise self.error(key, value, "is not a string", form)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        present, value = self._raw(key)
        if not present:
            return default
        if not isinstance(value, bool):
            raise self.error(key, value, "is not a boolean", "true or false")
        return value

    def choice(self, key: str, default: str, choices: Iterable[str]) -> str:
        options = tuple(choices)
        value = self.string(key, default, f"one of {', '.join(options)}")
        lowered = value.lower()
        if lowered not in options:
            raise self.error(key, value, "is not allowed", f"one of {', '.join(options)}")
        return lowered

    def string_list(self, key: str, default: list[str] | None, choices: Iterable[str]):
        """A list of strings from `choices`; None (absent or null) keeps `default`."""
        present, value = self._raw(key)
        if not present:
            return default
        options = tuple(choices)
        form = f"a list of {', '.join(options)}"
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, value, "is not a list of strings", form)
        out = []
        for item in value:
            if item.lower() not in options:
                raise self.error(key, item, "is not allowed", form)
            out.append(item.lower())
        return out

    def optional_integer(self, key: str, low: int, high: int) -> int | None:
        """An integer in low..high, or None when the key is absent (or null)."""
        present, _ = self._raw(key)
        return self.integer(key, low, low, high) if present else None

    def address(self, key: str, text: str, **kwargs: Any) -> TransportAddress:
        """`text` (this key's value) as a transport address; the error names the key."""
        try:
            return parse_address(text, **kwargs)
        except AddressError as exc:
            raise ConfigError(f"{self.source}: {self.prefix}{key}: {exc}") from None

    def bind_address(self, key: str, default: str) -> TransportAddress | None:
        """A `[HOST]:PORT` to listen on over TCP (the metrics endpoints); None when empty."""
        text = self.string(key, default, "[HOST]:PORT or an empty string")
        if not text:
            return None
        return self.address(
            key, text, default_protocol="tcp", protocols=("tcp",), port_required=True, listen=True
        )

    def raw(self, key: str) -> Any:
        """The value as the file has it (None when absent), for checks no typed reader makes."""
        return self._raw(key)[1]

    def ignore(self, keys: Iterable[str]) -> list[str]:
        """Accept `keys` without reading them (keys of Antrea's that antrea-flow does not
        use); the ones present."""
        present = []
        for key in keys:
            self.ignored.add(key)
            if self.values.get(key) is not None:
                present.append(key)
        return present

    def section(self, key: str) -> ConfigReader | None:
        present, value = self._raw(key)
        if not present:
            return None
        if not isinstance(value, dict):
            raise self.error(key, value, "is not a mapping", "a mapping of keys")
        return ConfigReader(self.source, value, f"{self.prefix}{key}.")

    def reject_unknown(self) -> None:
        """Raise for the first key no reader method looked at (read or `ignore`d)."""
        for key in self.values:
            if key in self.used or key in self.ignored:
                continue
            known = sorted(self.used | self.ignored)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {self.prefix}{close[0]}?)" if close else ""
            raise ConfigError(
                f"{self.source}: unknown config key {self.prefix}"
                f"{cut(key) if isinstance(key, str) else shown(key)}: "
                f"{shown(self.values[key])}{hint}; "
                f"expected one of {', '.join(sorted(self.used))}"
            )


def read_kubeconfig(reader: ConfigReader) -> str:
    """`clientConnection.kubeconfig` (Antrea's key): the kubeconfig file of the API server
    to use; "" for none. The section's other keys (content types, qps, burst) tune Go's
    client and are accepted as they are."""
    section = reader.section("clientConnection")
    if section is None:
        return ""
    path = section.string("kubeconfig", "", "a path to a kubeconfig file")
    section.ignore(("acceptContentTypes", "contentType", "qps", "burst"))
    section.reject_unknown()
    return path
