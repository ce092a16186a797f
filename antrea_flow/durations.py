"""Go duration strings ("5s", "1m30s", "300ms", "1.5h"), as Antrea's config files use them."""

from __future__ import annotations

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek small letter mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
ACCEPTED_FORM = 'a Go duration such as "5s", "1m30s" or "500ms" (units ns, us, µs, ms, s, m, h)'


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string; ValueError for anything else.

    Like Go's time.ParseDuration: a sequence of decimal numbers with units, an optional
    sign, and a bare "0".
    """
    if not isinstance(text, str):
        raise ValueError(f"a {type(text).__name__} is not a string")
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"{text!r} is empty")
    total = 0.0
    pos = 0
    for match in _PART.finditer(s):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"{text!r} is not a Go duration")
    return sign * total


def format_duration(seconds: float) -> str:
    """A short Go-style rendering: 90 -> "1m30s", 0.5 -> "500ms", 1e-9 -> "1ns"."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if 0 < seconds < 1:
        for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
            if seconds >= scale or unit == "ns":
                return f"{round(seconds / scale, 6):g}{unit}"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, whole_secs = divmod(rest, 60)
    secs = whole_secs + (seconds - whole)
    out = ""
    if hours:
        out += f"{hours}h"
    if minutes:
        out += f"{minutes}m"
    if secs or not out:
        out += f"{secs:g}s"
    return out
