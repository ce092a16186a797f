"""Go duration strings, as Antrea's config files write them (time.ParseDuration syntax)."""

import pytest

from antrea_flow.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1ns", 1e-9),
        ("250ns", 250e-9),
        ("1us", 1e-6),
        ("1\u00b5s", 1e-6),  # micro sign
        ("1\u03bcs", 1e-6),  # Greek small letter mu
        ("300ms", 0.3),
        ("5s", 5.0),
        ("2m", 120.0),
        ("3h", 10800.0),
        ("1m30s", 90.0),
        ("1h2m3.5s", 3723.5),
        ("1h30m", 5400.0),
        ("2h45m10s", 9910.0),
        ("1s500ms", 1.5),
        ("1m1us", 60.000001),
        (".5s", 0.5),
        ("1.5h", 5400.0),
        ("0.25m", 15.0),
        ("1.s", 1.0),  # Go accepts a trailing point
        ("0s", 0.0),
        ("0", 0.0),
        ("+0", 0.0),
        ("-0", 0.0),
        ("+5s", 5.0),
        ("-5s", -5.0),
        ("-1.5h", -5400.0),
        ("-1m30s", -90.0),
        ("15s", 15.0),
        ("60s", 60.0),
    ],
)
def test_parse_duration_accepts_go_syntax(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


def test_micro_sign_and_greek_mu_are_distinct_code_points_and_both_accepted():
    assert "\u00b5" != "\u03bc"
    assert parse_duration("7\u00b5s") == parse_duration("7\u03bcs") == parse_duration("7us")


def test_units_are_not_confused_with_their_prefixes():
    # "ms" is milliseconds, not minutes followed by seconds; "m" alone is minutes.
    assert parse_duration("5ms") == pytest.approx(0.005)
    assert parse_duration("5m") == 300.0
    assert parse_duration("5m5s") == 305.0


@pytest.mark.parametrize(
    "text",
    [
        "5",  # a number needs a unit (only a bare 0 may go without)
        "s",  # a unit needs a number
        "1x",
        "5 s",
        "",
        "1.2.3s",
        ".s",
        "-",
        "+",
        "5s5",
        "1h 2m",
        "1S",  # units are case-sensitive
        "1H",
        "1sec",
        "1d",
        "ms",
        "00",
        "0x10s",
        "1e3s",
    ],
)
def test_parse_duration_rejects_what_go_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("value", [5, 5.0, None, b"5s", ["5s"]])
def test_parse_duration_rejects_non_strings(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (90, "1m30s"),
        (0.5, "500ms"),
        (5, "5s"),
        (60, "1m"),
        (3600, "1h"),
        (5400, "1h30m"),
        (3723.5, "1h2m3.5s"),
        (0, "0s"),
        (1.5, "1.5s"),
        (0.001, "1ms"),
        (15, "15s"),
    ],
)
def test_format_duration_short_go_style(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    "seconds",
    [0, 1, 1.5, 0.5, 0.001, 0.25, 59, 60, 61, 90, 3599, 3600, 3723.5, 5400, 86400, 1e-6, 1e-9,
     2.5e-7, 7e-6, 0.0001],
)  # fmt: skip
def test_format_duration_output_parses_back_to_the_same_value(seconds):
    # What it renders appears in error messages and warnings next to the accepted form;
    # it has to be a duration the user could write in the config file.
    text = format_duration(seconds)
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-9, abs=1e-15), text
