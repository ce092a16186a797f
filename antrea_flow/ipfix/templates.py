"""Templates and their compiled record codecs.

A template is compiled once into a pair of generated functions: `encode(values)` turns a
sequence of values in template order into the bytes of one data record, and
`decode(buf, offset)` turns the bytes at `offset` back into a dict keyed by IE name. Runs of
fixed-length fields become one precompiled `struct.Struct`; variable-length fields are
inlined. The per-record path therefore does no registry lookups, no per-field dispatch and
no per-field function calls beyond what the data type needs.

Python values: integers for unsigned/signed and dateTimeSeconds/Milliseconds (epoch seconds
and milliseconds), integers of epoch microseconds/nanoseconds for the NTP-format
dateTimeMicroseconds/Nanoseconds, float, bool, str for string, ipv4Address, ipv6Address and
macAddress ("aa:bb:cc:dd:ee:ff"), bytes for octetArray and structured lists.
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .elements import (
    REGISTRY,
    VARIABLE_LENGTH,
    DataType,
    InformationElement,
    Registry,
)

MIN_TEMPLATE_ID = 256


class TemplateError(ValueError):
    """A template that cannot describe valid records (bad id, lengths or field count)."""


@dataclass(frozen=True, slots=True)
class Field:
    """One template entry: an information element and its on-wire length."""

    element: InformationElement
    length: int

    @property
    def variable(self) -> bool:
        return self.length == VARIABLE_LENGTH


_T = DataType
_UNSIGNED = {_T.unsigned8, _T.unsigned16, _T.unsigned32, _T.unsigned64}
_SIGNED = {_T.signed8, _T.signed16, _T.signed32, _T.signed64}
_VARIABLE_OK = {_T.octetArray, _T.string, _T.basicList, _T.subTemplateList, _T.subTemplateMultiList}
_INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
_SINT_CODES = {1: "b", 2: "h", 4: "i", 8: "q"}

# NTP epoch (1900) to Unix epoch (1970), for dateTimeMicroseconds/Nanoseconds (RFC 7011 6.1.9).
_NTP_OFFSET = 2208988800


def _ntp_from_ns(ns: int) -> int:
    seconds, rest = divmod(ns, 1_000_000_000)
    # Round the fraction up so that decoding (which rounds down) gives back `ns` exactly.
    return ((seconds + _NTP_OFFSET) << 32) | -(-(rest << 32) // 1_000_000_000)


def _ns_from_ntp(value: int) -> int:
    return ((value >> 32) - _NTP_OFFSET) * 1_000_000_000 + (
        ((value & 0xFFFFFFFF) * 1_000_000_000) >> 32
    )


def _mac_to_bytes(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return raw


def _check_length(raw: bytes, length: int) -> bytes:
    if len(raw) != length:
        raise ValueError(f"fixed-length octetArray needs {length} bytes, got {len(raw)}")
    return raw


def _fixed_string(text: str, length: int) -> bytes:
    raw = text.encode()
    if len(raw) > length:
        raise ValueError(f"string of {len(raw)} bytes does not fit a {length}-byte field")
    return raw.ljust(length, b"\0")


def _inet6_aton(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def _inet6_ntoa(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6, raw)


_HELPERS: dict[str, Any] = {
    "aton4": socket.inet_aton,
    "ntoa4": socket.inet_ntoa,
    "aton6": _inet6_aton,
    "ntoa6": _inet6_ntoa,
    "mac_to_bytes": _mac_to_bytes,
    "ntp_from_ns": _ntp_from_ns,
    "ns_from_ntp": _ns_from_ntp,
    "check_length": _check_length,
    "fixed_string": _fixed_string,
    "from_bytes": int.from_bytes,
    "LEN1": [bytes((n,)) for n in range(255)],
    "U16": struct.Struct(">H"),
}

_ZERO_VALUES = {
    _T.octetArray: b"",
    _T.string: "",
    _T.float32: 0.0,
    _T.float64: 0.0,
    _T.boolean: False,
    _T.macAddress: "00:00:00:00:00:00",
    _T.ipv4Address: "0.0.0.0",
    _T.ipv6Address: "::",
    _T.basicList: b"",
    _T.subTemplateList: b"",
    _T.subTemplateMultiList: b"",
}


def zero_value(field: Field) -> Any:
    """The value an absent field takes: 0, "", b"", 0.0.0.0, :: and so on."""
    if field.element.data_type == _T.octetArray and not field.variable:
        return bytes(field.length)
    return _ZERO_VALUES.get(field.element.data_type, 0)


def validate_field(field: Field) -> None:
    """Raise TemplateError unless the length is legal for the element's type (RFC 7011 6.2)."""
    ie, length = field.element, field.length
    natural = ie.natural_length
    if length == VARIABLE_LENGTH:
        if ie.data_type not in _VARIABLE_OK:
            raise TemplateError(
                f"{ie.name}: variable length is not allowed for {ie.data_type.name}"
            )
        return
    if length == 0:
        raise TemplateError(f"{ie.name}: zero field length")
    if ie.data_type in _VARIABLE_OK:
        return
    reducible = ie.data_type in _UNSIGNED or ie.data_type in _SIGNED
    if ie.data_type == _T.float64 and length in (4, 8):
        return
    if length == natural or (reducible and length < natural):
        return
    raise TemplateError(f"{ie.name}: length {length} is not valid for {ie.data_type.name}")


class _CodeGen:
    """Builds the source of one template's encode and decode functions."""

    def __init__(self, fields: Sequence[Field], keys: Sequence[str]):
        self.fields = fields
        self.keys = keys
        self.namespace: dict[str, Any] = dict(_HELPERS)
        self._structs = 0

    def _struct(self, codes: list[str]) -> tuple[str, struct.Struct]:
        name = f"S{self._structs}"
        self._structs += 1
        compiled = struct.Struct(">" + "".join(codes))
        self.namespace[name] = compiled
        return name, compiled

    # -- encoding -------------------------------------------------------------------------

    @staticmethod
    def _encode_fixed(field: Field, var: str) -> tuple[str, str]:
        """(struct code, expression producing the packed argument) for a fixed field."""
        t, n = field.element.data_type, field.length
        if t in _UNSIGNED or t in (_T.dateTimeSeconds, _T.dateTimeMilliseconds):
            if n in _INT_CODES:
                return _INT_CODES[n], var
            return f"{n}s", f"{var}.to_bytes({n}, 'big')"
        if t in _SIGNED:
            if n in _SINT_CODES:
                return _SINT_CODES[n], var
            return f"{n}s", f"{var}.to_bytes({n}, 'big', signed=True)"
        if t in (_T.float32, _T.float64):
            return ("f" if n == 4 else "d"), var
        if t == _T.boolean:
            return "B", f"(1 if {var} else 2)"
        if t in (_T.dateTimeMicroseconds, _T.dateTimeNanoseconds):
            scale = " * 1000" if t == _T.dateTimeMicroseconds else ""
            return "Q", f"ntp_from_ns({var}{scale})"
        if t == _T.ipv4Address:
            return "4s", f"aton4({var})"
        if t == _T.ipv6Address:
            return "16s", f"aton6({var})"
        if t == _T.macAddress:
            return "6s", f"mac_to_bytes({var})"
        if t == _T.string:
            return f"{n}s", f"fixed_string({var}, {n})"
        return f"{n}s", f"check_length({var}, {n})"

    def encoder(self) -> str:
        n = len(self.fields)
        lines = ["def encode(values):"]
        lines.append("    (" + "".join(f"v{i}, " for i in range(n)) + ") = values")
        parts: list[str] = []
        codes: list[str] = []
        args: list[str] = []

        def flush() -> None:
            if codes:
                name, _ = self._struct(codes)
                parts.append(f"{name}.pack({', '.join(args)})")
                codes.clear()
                args.clear()

        for i, field in enumerate(self.fields):
            var = f"v{i}"
            if not field.variable:
                code, arg = self._encode_fixed(field, var)
                codes.append(code)
                args.append(arg)
                continue
            flush()
            if field.element.data_type == _T.string:
                lines.append(f"    b{i} = {var}.encode()")
            else:
                lines.append(f"    b{i} = bytes({var})")
            lines.append(f"    n{i} = len(b{i})")
            parts.append(f"(LEN1[n{i}] + b{i} if n{i} < 255 else b'\\xff' + U16.pack(n{i}) + b{i})")
        flush()
        lines.append("    return b''.join((" + ", ".join(parts) + ",))")
        return "\n".join(lines)

    # -- decoding -------------------------------------------------------------------------

    @staticmethod
    def _decode_fixed(field: Field, raw: str) -> tuple[str, str]:
        """(struct code, expression converting the unpacked item) for a fixed field."""
        t, n = field.element.data_type, field.length
        if t in _UNSIGNED or t in (_T.dateTimeSeconds, _T.dateTimeMilliseconds):
            if n in _INT_CODES:
                return _INT_CODES[n], raw
            return f"{n}s", f"from_bytes({raw}, 'big')"
        if t in _SIGNED:
            if n in _SINT_CODES:
                return _SINT_CODES[n], raw
            return f"{n}s", f"from_bytes({raw}, 'big', signed=True)"
        if t in (_T.float32, _T.float64):
            return ("f" if n == 4 else "d"), raw
        if t == _T.boolean:
            return "B", f"({raw} == 1)"
        if t == _T.dateTimeMicroseconds:
            return "Q", f"(ns_from_ntp({raw}) // 1000)"
        if t == _T.dateTimeNanoseconds:
            return "Q", f"ns_from_ntp({raw})"
        if t == _T.ipv4Address:
            return "4s", f"ntoa4({raw})"
        if t == _T.ipv6Address:
            return "16s", f"ntoa6({raw})"
        if t == _T.macAddress:
            return "6s", f"{raw}.hex(':')"
        if t == _T.string:
            return f"{n}s", f"{raw}.rstrip(b'\\0').decode('utf-8', 'replace')"
        return f"{n}s", raw

    def decoder(self) -> str:
        lines = ["def decode(buf, o):"]
        codes: list[str] = []
        targets: list[str] = []
        results: list[str] = []

        def flush() -> None:
            if not codes:
                return
            name, compiled = self._struct(codes)
            if compiled.format == ">B":
                lines.append(f"    {targets[0]} = buf[o]")
            else:
                lines.append(f"    {', '.join(targets)}, = {name}.unpack_from(buf, o)")
            lines.append(f"    o += {compiled.size}")
            codes.clear()
            targets.clear()

        for i, field in enumerate(self.fields):
            if not field.variable:
                code, expr = self._decode_fixed(field, f"r{i}")
                codes.append(code)
                targets.append(f"r{i}")
                results.append(expr)
                continue
            flush()
            text = field.element.data_type == _T.string
            convert = "buf[o:o + n].decode('utf-8', 'replace')" if text else "buf[o:o + n]"
            empty = "''" if text else "b''"
            lines += [
                "    n = buf[o]",
                "    if n == 0:",
                f"        r{i} = {empty}",
                "        o += 1",
                "    else:",
                "        if n == 255:",
                "            n = U16.unpack_from(buf, o + 1)[0]",
                "            o += 3",
                "        else:",
                "            o += 1",
                f"        r{i} = {convert}",
                "        o += n",
            ]
            results.append(f"r{i}")
        flush()
        items = ", ".join(f"{key!r}: {expr}" for key, expr in zip(self.keys, results, strict=True))
        lines.append(f"    return {{{items}}}, o")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Codec:
    encode: Callable[[Sequence[Any]], bytes]
    decode: Callable[[bytes, int], tuple[dict[str, Any], int]]
    source: str


def _record_keys(fields: Sequence[Field]) -> list[str]:
    """IE names as dict keys; a repeated element gets '#2', '#3' so no value is lost."""
    seen: dict[str, int] = {}
    keys = []
    for field in fields:
        name = field.element.name
        count = seen.get(name, 0) + 1
        seen[name] = count
        keys.append(name if count == 1 else f"{name}#{count}")
    return keys


@functools.lru_cache(maxsize=1024)
def _compile(fields: tuple[Field, ...]) -> Codec:
    # Cached by layout: a hundred exporters sending the same template share one codec.
    gen = _CodeGen(fields, _record_keys(fields))
    source = gen.encoder() + "\n\n" + gen.decoder() + "\n"
    namespace = gen.namespace
    exec(compile(source, f"<ipfix template {len(fields)} fields>", "exec"), namespace)
    return Codec(namespace["encode"], namespace["decode"], source)


class Template:
    """A data or options template, compiled for encoding and decoding records."""

    __slots__ = (
        "template_id",
        "fields",
        "scope_field_count",
        "keys",
        "encode",
        "decode",
        "min_record_length",
        "_codec",
    )

    def __init__(self, template_id: int, fields: Sequence[Field], scope_field_count: int = 0):
        if not MIN_TEMPLATE_ID <= template_id <= 0xFFFF:
            raise TemplateError(f"template id {template_id} is outside 256..65535")
        if not fields:
            raise TemplateError(f"template {template_id} has no fields")
        if not 0 <= scope_field_count <= len(fields):
            raise TemplateError(f"template {template_id}: bad scope field count")
        for field in fields:
            validate_field(field)
        self.template_id = template_id
        self.fields = tuple(fields)
        self.scope_field_count = scope_field_count
        self.keys = tuple(_record_keys(self.fields))
        self._codec = _compile(self.fields)
        self.encode = self._codec.encode
        self.decode = self._codec.decode
        self.min_record_length = sum(1 if f.variable else f.length for f in self.fields)

    @classmethod
    def from_names(
        cls, template_id: int, names: Sequence[str], registry: Registry = REGISTRY
    ) -> Template:
        """A template of registered elements at their natural lengths."""
        fields = []
        for name in names:
            ie = registry.by_name(name)
            fields.append(Field(ie, ie.natural_length))
        return cls(template_id, fields)

    @property
    def source(self) -> str:
        """The generated codec source, for debugging."""
        return self._codec.source

    @property
    def is_options(self) -> bool:
        return self.scope_field_count > 0

    def values_from(self, record: Mapping[str, Any]) -> list[Any]:
        """Values in template order from a name-keyed mapping; absent fields take zero values."""
        return [
            record[key] if key in record else zero_value(field)
            for key, field in zip(self.keys, self.fields, strict=True)
        ]

    def encode_mapping(self, record: Mapping[str, Any]) -> bytes:
        return self.encode(self.values_from(record))

    def explain_encode_error(self, values: Sequence[Any]) -> str:
        """Which field made `encode` fail, and why (slow; only used after a failure)."""
        if len(values) != len(self.fields):
            return f"template {self.template_id} has {len(self.fields)} fields, got {len(values)}"
        for field, value in zip(self.fields, values, strict=True):
            single = Template(self.template_id, [field])
            try:
                single.encode([value])
            except Exception as exc:
                return f"{field.element.name}={value!r}: {exc}"
        return "no single field fails"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Template)
            and self.template_id == other.template_id
            and self.fields == other.fields
            and self.scope_field_count == other.scope_field_count
        )

    def __hash__(self) -> int:
        return hash((self.template_id, self.fields, self.scope_field_count))

    def __repr__(self) -> str:
        return f"Template({self.template_id}, {len(self.fields)} fields)"
