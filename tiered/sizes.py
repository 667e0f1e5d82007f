"""Byte sizes and rates as people write them ("8GiB", "400MB/s") and back.

Units are case-insensitive and may be separated from the number by spaces:

* ``B`` (or no unit): bytes
* ``KB MB GB TB PB``: powers of 1000 (SI, as disk vendors use them)
* ``KiB MiB GiB TiB PiB``: powers of 1024
* ``K M G T P``: powers of 1024 too, as in ``dd`` and ``ls -h``

Fractions are allowed only when the result is a whole number of bytes
("1.5GiB" is fine, "1.5B" is an error): silently rounding a budget would
hide a typo.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

__all__ = ["SizeError", "parse_size", "parse_rate", "format_size", "format_rate"]

_UNITS: dict[str, int] = {"": 1, "b": 1}
for _i, _p in enumerate("kmgtp", start=1):
    _UNITS[_p] = 1024**_i
    _UNITS[_p + "b"] = 1000**_i
    _UNITS[_p + "ib"] = 1024**_i

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)\s*$")
_RATE_SUFFIX_RE = re.compile(r"\s*/\s*s(?:ec)?\s*$", re.IGNORECASE)

_SIZE_EXPECTED = "expected a size in bytes such as 8GiB, 500MB, '4 KiB', 1.5GiB or 4096"
_RATE_EXPECTED = "expected a rate in bytes per second such as 400MB/s, 1GiB/s or 1000000"


class SizeError(ValueError):
    """A size or rate that cannot be parsed.

    Carries ``where``, ``value`` and ``reason`` separately so callers (the
    config loader) can re-word the message without parsing it.
    """

    def __init__(self, where: str, value: object, reason: str) -> None:
        self.where = where
        self.value = value
        self.reason = reason
        super().__init__(f"{where} = {value!r}: {reason}")


def _parse(value: object, where: str, expected: str, *, rate: bool) -> int:
    if isinstance(value, bool):  # bool is an int subclass; True is not 1 byte
        raise SizeError(where, value, expected)
    if isinstance(value, int):
        amount = Fraction(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise SizeError(where, value, expected)
        amount = Fraction(value)
    elif isinstance(value, str):
        text = value
        if rate:
            text = _RATE_SUFFIX_RE.sub("", text)
        if text.strip().startswith("-"):
            raise SizeError(where, value, f"must not be negative; {expected}")
        m = _SIZE_RE.match(text)
        if m is None:
            raise SizeError(where, value, expected)
        number, unit = m.groups()
        scale = _UNITS.get(unit.lower())
        if scale is None:
            raise SizeError(where, value, f"unknown unit {unit!r}; {expected}")
        amount = Fraction(number) * scale
    else:
        raise SizeError(where, value, expected)
    if amount < 0:
        raise SizeError(where, value, f"must not be negative; {expected}")
    if amount.denominator != 1:
        raise SizeError(where, value, f"is not a whole number of bytes; {expected}")
    return int(amount)


def parse_size(value: object, *, where: str = "size") -> int:
    """Bytes (>= 0) from an int, an integral float or a string such as "8GiB".

    ``where`` names the value in the error message (e.g. a dotted config key).
    Raises :class:`SizeError` (a ``ValueError``).
    """
    return _parse(value, where, _SIZE_EXPECTED, rate=False)


def parse_rate(value: object, *, where: str = "rate") -> int:
    """Bytes per second (> 0) from an int or a string such as "400MB/s".

    The "/s" suffix is optional. Zero is rejected: a zero throttle would stall
    every transfer rather than mean "unlimited" (leave the key out for that).
    """
    n = _parse(value, where, _RATE_EXPECTED, rate=True)
    if n == 0:
        raise SizeError(where, value, f"must be greater than zero; {_RATE_EXPECTED}")
    return n


def format_size(n: int) -> str:
    """Human form in binary units: 8589934592 -> "8 GiB", 1500 -> "1.46 KiB"."""
    sign = "-" if n < 0 else ""
    v = float(abs(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        # Compare the rounded value so 1048575 reads "1 MiB", not "1024 KiB".
        if round(v, 2) < 1024 or unit == "PiB":
            break
        v /= 1024
    if unit == "B":
        return f"{sign}{int(v)} B"
    text = f"{v:.2f}".rstrip("0").rstrip(".")
    return f"{sign}{text} {unit}"


def format_rate(n: int) -> str:
    """Human form of a bytes/second rate: 419430400 -> "400 MiB/s"."""
    return f"{format_size(n)}/s"


def parse_share(value: object, capacity: int, *, where: str = "share") -> int:
    """Bytes of a share of a tier of ``capacity`` bytes: a size ("2GiB", an int) or a percentage
    of the capacity ("25%"). Raises :class:`SizeError`."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            pct = -1.0
        if not 0 <= pct <= 100:
            raise SizeError(where, value, 'expected a percentage from "0%" to "100%" or a size such as "2GiB"')
        return int(capacity * pct / 100)
    return parse_size(value, where=where)
