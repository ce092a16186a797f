"""Templates and their record codecs.

A template turns data records into dicts keyed by IE name and values (in template order)
into records. Two codecs implement that for a template, with the same results:

- an interpreted one, built in O(fields) from a plan of precompiled `struct.Struct` runs and
  per-type converters: what a template announced by a peer starts with, so that announcing
  a template costs a collector next to nothing;
- a compiled one: Python source generated for the layout and compiled, with runs of fixed
  fields unpacked at once and variable-length fields inlined (about 1.8 times as fast).
  Compiling costs a few milliseconds per dozen fields, so a layout earns it by use: after
  `COMPILE_AFTER` records decoded with it, in any session (or at once for the templates we
  export). Compiled codecs are shared by every template of the same layout (a hundred
  agents announcing the same template compile it once, and their templates switch to it)
  and freed with the last template that uses them.

Python values: integers for unsigned/signed and dateTimeSeconds/Milliseconds (epoch seconds
and milliseconds), integers of epoch microseconds/nanoseconds for the NTP-format
dateTimeMicroseconds/Nanoseconds, float, bool, str for string, ipv4Address, ipv6Address and
macAddress ("aa:bb:cc:dd:ee:ff"), bytes for octetArray and structured lists.
"""

from __future__ import annotations

import functools
import socket
import struct
import weakref
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
# Records a template decodes with its interpreted codec before it is compiled: compiling
# then costs about what interpreting those records did, so no peer makes us compile more
# than it makes us decode.
COMPILE_AFTER = 1024


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

Converter = Callable[[Any], Any]


def _ntp_from_ns(ns: int) -> int:
    seconds, rest = divmod(ns, 1_000_000_000)
    # Round the fraction up so that decoding (which rounds down) gives back `ns` exactly.
    return ((seconds + _NTP_OFFSET) << 32) | -(-(rest << 32) // 1_000_000_000)


def _ns_from_ntp(value: int) -> int:
    return ((value >> 32) - _NTP_OFFSET) * 1_000_000_000 + (
        ((value & 0xFFFFFFFF) * 1_000_000_000) >> 32
    )


def _ntp_from_us(us: int) -> int:
    return _ntp_from_ns(us * 1000)


def _us_from_ntp(value: int) -> int:
    return _ns_from_ntp(value) // 1000


def _mac_to_bytes(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return raw


def _mac_from_bytes(raw: bytes) -> str:
    return raw.hex(":")


def _inet6_aton(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def _inet6_ntoa(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6, raw)


def _boolean_to_wire(value: Any) -> int:
    return 1 if value else 2  # RFC 7011 6.1.5: true is 1, false is 2


def _boolean_from_wire(value: int) -> bool:
    return value == 1


def _fixed_string_to_bytes(length: int, text: str) -> bytes:
    raw = text.encode()
    if len(raw) > length:
        raise ValueError(f"string of {len(raw)} bytes does not fit a {length}-byte field")
    return raw.ljust(length, b"\0")


def _fixed_string_from_bytes(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _check_length(length: int, raw: bytes) -> bytes:
    if len(raw) != length:
        raise ValueError(f"fixed-length octetArray needs {length} bytes, got {len(raw)}")
    return raw


def _int_to_bytes(length: int, signed: bool, value: int) -> bytes:
    return value.to_bytes(length, "big", signed=signed)


def _int_from_bytes(signed: bool, raw: bytes) -> int:
    return int.from_bytes(raw, "big", signed=signed)


def _fixed(field: Field) -> tuple[str, Converter | None, Converter | None]:
    """(struct code, value -> packable, unpacked -> value) of a fixed-length field; a
    converter is None where struct's own value is the Python value."""
    t, n = field.element.data_type, field.length
    if t in _UNSIGNED or t in (_T.dateTimeSeconds, _T.dateTimeMilliseconds):
        if n in _INT_CODES:
            return _INT_CODES[n], None, None
        return (
            f"{n}s",
            functools.partial(_int_to_bytes, n, False),
            functools.partial(_int_from_bytes, False),
        )
    if t in _SIGNED:
        if n in _SINT_CODES:
            return _SINT_CODES[n], None, None
        return (
            f"{n}s",
            functools.partial(_int_to_bytes, n, True),
            functools.partial(_int_from_bytes, True),
        )
    if t in (_T.float32, _T.float64):
        return ("f" if n == 4 else "d"), None, None
    if t == _T.boolean:
        return "B", _boolean_to_wire, _boolean_from_wire
    if t == _T.dateTimeMicroseconds:
        return "Q", _ntp_from_us, _us_from_ntp
    if t == _T.dateTimeNanoseconds:
        return "Q", _ntp_from_ns, _ns_from_ntp
    if t == _T.ipv4Address:
        return "4s", socket.inet_aton, socket.inet_ntoa
    if t == _T.ipv6Address:
        return "16s", _inet6_aton, _inet6_ntoa
    if t == _T.macAddress:
        return "6s", _mac_to_bytes, _mac_from_bytes
    if t == _T.string:
        return f"{n}s", functools.partial(_fixed_string_to_bytes, n), _fixed_string_from_bytes
    return f"{n}s", functools.partial(_check_length, n), None


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


_U16 = struct.Struct(">H")
_LEN1 = [bytes((n,)) for n in range(255)]


def _runs(fields: Sequence[Field]) -> list[list[int] | int]:
    """The template as runs: a list of the indexes of consecutive fixed fields, or the
    index of one variable-length field."""
    runs: list[list[int] | int] = []
    for i, field in enumerate(fields):
        if field.variable:
            runs.append(i)
        elif runs and isinstance(runs[-1], list):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


# -- interpreted codec --------------------------------------------------------------------


def _interpreted_decoder(
    fields: Sequence[Field], keys: Sequence[str]
) -> Callable[[bytes, int], tuple[dict[str, Any], int]]:
    """A decoder that walks a plan of the template: cheap to build, slower to run."""
    steps: list[tuple] = []
    for run in _runs(fields):
        if isinstance(run, int):
            steps.append((False, keys[run], fields[run].element.data_type == _T.string))
            continue
        specs = [_fixed(fields[i]) for i in run]
        unpack = struct.Struct(">" + "".join(code for code, _, _ in specs))
        converters = tuple(from_wire for _, _, from_wire in specs)
        plain = all(c is None for c in converters)
        steps.append((True, unpack, tuple(keys[i] for i in run), converters, plain))
    plan = tuple(steps)

    def decode(buf: bytes, o: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        for step in plan:
            if step[0]:
                _, unpack, run_keys, converters, plain = step
                values = unpack.unpack_from(buf, o)
                o += unpack.size
                if plain:
                    out.update(zip(run_keys, values, strict=True))
                else:
                    for key, convert, value in zip(run_keys, converters, values, strict=True):
                        out[key] = value if convert is None else convert(value)
                continue
            n = buf[o]
            if n == 0:
                out[step[1]] = "" if step[2] else b""
                o += 1
                continue
            if n == 255:
                n = _U16.unpack_from(buf, o + 1)[0]
                o += 3
            else:
                o += 1
            # A length past the buffer leaves `o` past the set's end, which the caller checks.
            raw = buf[o : o + n]
            out[step[1]] = raw.decode("utf-8", "replace") if step[2] else raw
            o += n
        return out, o

    return decode


# -- compiled codec -----------------------------------------------------------------------


class _CodeGen:
    """Builds the source of one layout's encode and decode functions. Converters are
    referenced by name from the namespace the source runs in."""

    def __init__(self, fields: Sequence[Field], keys: Sequence[str]):
        self.fields = fields
        self.keys = keys
        self.namespace: dict[str, Any] = {"U16": _U16, "LEN1": _LEN1}
        self.specs = {i: _fixed(f) for i, f in enumerate(fields) if not f.variable}

    def _name(self, prefix: str, i: int, value: Any) -> str:
        name = f"{prefix}{i}"
        self.namespace[name] = value
        return name

    def encoder(self) -> str:
        n = len(self.fields)
        lines = ["def encode(values):"]
        lines.append("    (" + "".join(f"v{i}, " for i in range(n)) + ") = values")
        parts: list[str] = []
        for number, run in enumerate(_runs(self.fields)):
            if isinstance(run, int):
                var, field = f"v{run}", self.fields[run]
                text = field.element.data_type == _T.string
                lines.append(
                    f"    b{run} = {var}.encode()" if text else f"    b{run} = bytes({var})"
                )
                lines.append(f"    n{run} = len(b{run})")
                parts.append(
                    f"(LEN1[n{run}] + b{run} if n{run} < 255 else "
                    f"b'\\xff' + U16.pack(n{run}) + b{run})"
                )
                continue
            codes, args = [], []
            for i in run:
                code, to_wire, _ = self.specs[i]
                codes.append(code)
                args.append(f"v{i}" if to_wire is None else f"{self._name('e', i, to_wire)}(v{i})")
            packer = self._name("S", number, struct.Struct(">" + "".join(codes)))
            parts.append(f"{packer}.pack({', '.join(args)})")
        lines.append("    return b''.join((" + ", ".join(parts) + ",))")
        return "\n".join(lines)

    def decoder(self) -> str:
        lines = ["def decode(buf, o):"]
        results: list[str] = []
        for number, run in enumerate(_runs(self.fields)):
            if isinstance(run, int):
                text = self.fields[run].element.data_type == _T.string
                convert = "buf[o:o + n].decode('utf-8', 'replace')" if text else "buf[o:o + n]"
                empty = "''" if text else "b''"
                # Empty values (unset names, most policy fields) without a slice.
                lines += [
                    "    n = buf[o]",
                    "    if n == 0:",
                    f"        r{run} = {empty}",
                    "        o += 1",
                    "    else:",
                    "        if n == 255:",
                    "            n = U16.unpack_from(buf, o + 1)[0]",
                    "            o += 3",
                    "        else:",
                    "            o += 1",
                    f"        r{run} = {convert}",
                    "        o += n",
                ]
                results.append(f"r{run}")
                continue
            codes = [self.specs[i][0] for i in run]
            unpack = struct.Struct(">" + "".join(codes))
            if unpack.format == ">B":
                lines.append(f"    r{run[0]} = buf[o]")
            else:
                name = self._name("S", number, unpack)
                lines.append(f"    {''.join(f'r{i}, ' for i in run)}= {name}.unpack_from(buf, o)")
            lines.append(f"    o += {unpack.size}")
            for i in run:
                from_wire = self.specs[i][2]
                results.append(
                    f"r{i}" if from_wire is None else f"{self._name('c', i, from_wire)}(r{i})"
                )
        items = ", ".join(f"{key!r}: {expr}" for key, expr in zip(self.keys, results, strict=True))
        lines.append(f"    return {{{items}}}, o")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Codec:
    """The compiled encode and decode functions of one layout."""

    encode: Callable[[Sequence[Any]], bytes]
    decode: Callable[[bytes, int], tuple[dict[str, Any], int]]
    source: str


# Records decoded per layout (by the hash of its fields, computed once per template: a
# collision only pools two layouts' counts), or COMPILED once the layout earned its codec.
# Bounded: the oldest counts go first.
_DECODED: dict[int, int] = {}
_DECODED_LAYOUTS = 4096
COMPILED = -1
# Compiled codecs by layout while some template uses them: a memo of pure functions, shared
# by the templates of every session (and freed with the last one).
_CODECS: weakref.WeakValueDictionary[tuple[Field, ...], Codec] = weakref.WeakValueDictionary()


def _compile(fields: tuple[Field, ...], keys: Sequence[str]) -> Codec:
    codec = _CODECS.get(fields)
    if codec is None:
        gen = _CodeGen(fields, keys)
        source = gen.encoder() + "\n\n" + gen.decoder() + "\n"
        namespace = gen.namespace
        exec(compile(source, f"<ipfix template {len(fields)} fields>", "exec"), namespace)
        codec = _CODECS[fields] = Codec(namespace["encode"], namespace["decode"], source)
    return codec


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


class Template:
    """A data or options template with its record codec.

    Owned by whoever created it (the exporting process for ours, a session's decoder for a
    peer's); `decoded` is only called by that owner's thread.
    """

    __slots__ = (
        "template_id",
        "fields",
        "scope_field_count",
        "keys",
        "min_record_length",
        "decoder",
        "_codec",
        "_layout",
    )

    def __init__(
        self,
        template_id: int,
        fields: Sequence[Field],
        scope_field_count: int = 0,
        *,
        compiled: bool = False,
    ):
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
        self.min_record_length = sum(1 if f.variable else f.length for f in self.fields)
        self._layout = hash(self.fields)
        # Another template of this layout may have compiled it already.
        self._codec: Codec | None = _CODECS.get(self.fields)
        self.decoder: Callable[[bytes, int], tuple[dict[str, Any], int]] = (
            self._codec.decode if self._codec else _interpreted_decoder(self.fields, self.keys)
        )
        if compiled:
            self.compile()

    @classmethod
    def from_names(
        cls, template_id: int, names: Sequence[str], registry: Registry = REGISTRY
    ) -> Template:
        """A template of registered elements at their natural lengths, compiled (ours)."""
        fields = []
        for name in names:
            ie = registry.by_name(name)
            fields.append(Field(ie, ie.natural_length))
        return cls(template_id, fields, compiled=True)

    def compile(self) -> Codec:
        """The compiled codec (compiling it, or sharing another template's, the first time)."""
        if self._codec is None:
            self._codec = _compile(self.fields, self.keys)
        self.decoder = self._codec.decode
        return self._codec

    @property
    def compiled(self) -> bool:
        return self._codec is not None

    def decoder_now(self) -> Callable[[bytes, int], tuple[dict[str, Any], int]]:
        """The decoder for the next data set: the compiled one once any template of this
        layout earned it (a hundred agents' sessions switch before their first set, not
        after it)."""
        if self._codec is None and _DECODED.get(self._layout) == COMPILED:
            self.compile()
        return self.decoder

    def decoded(self, records: int) -> None:
        """`records` more were decoded with `decoder`: compile once the layout earned it (in
        this session or any other), or take the codec another template compiled."""
        if self._codec is not None:
            return
        count = _DECODED.pop(self._layout, 0)
        if count != COMPILED:
            count += records
            if count < COMPILE_AFTER:
                if len(_DECODED) >= _DECODED_LAYOUTS:
                    del _DECODED[next(iter(_DECODED))]
                _DECODED[self._layout] = count
                return
        _DECODED[self._layout] = COMPILED
        self.compile()

    def decode(self, buf: bytes, offset: int) -> tuple[dict[str, Any], int]:
        """One record at `offset`: (IE name -> value, offset after it)."""
        return self.decoder(buf, offset)

    @property
    def encode(self) -> Callable[[Sequence[Any]], bytes]:
        """values in template order -> one record's bytes."""
        return self.compile().encode

    @property
    def source(self) -> str:
        """The generated codec source, for debugging."""
        return self.compile().source

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
