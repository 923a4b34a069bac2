"""`{{var}}` placeholders: compiled once per job, filled per recipient at send time.

A leaf module: submit uses it to find missing variables and header injection before a
job is accepted; delivery uses it to render. Both must agree on what a placeholder is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*\}\}")


class Text:
    """A string with placeholders, split once into literal and variable parts."""

    __slots__ = ("names", "parts", "source")

    def __init__(self, source: str):
        self.source = source
        self.parts: list[str] = PLACEHOLDER.split(source)  # literal, name, literal, name, ..., literal
        self.names: frozenset[str] = frozenset(self.parts[1::2])

    def render(self, values: Mapping[str, str]) -> str:
        parts = self.parts
        if len(parts) == 1:
            return parts[0]
        out = list(parts)
        for i in range(1, len(parts), 2):
            out[i] = values[parts[i]]
        return "".join(out)

    def literal_size(self) -> int:
        return sum(len(p.encode("utf-8")) for p in self.parts[0::2])

    def occurrences(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in self.parts[1::2]:
            counts[name] = counts.get(name, 0) + 1
        return counts

    def with_literal(self, literal: str, before: str = "") -> Text:
        """A copy with literal text added at the end, or before the last `before` marker
        (case-insensitive) when the text has one. The literal is never parsed for placeholders."""
        out = Text(self.source)
        last = out.parts[-1]
        if before:
            at = last.lower().rfind(before.lower())
            if at >= 0:
                out.parts[-1] = last[:at] + literal + last[at:]
                return out
        out.parts[-1] = last + literal
        return out

    def __bool__(self) -> bool:
        return bool(self.source)


def has_header_breaker(value: str) -> bool:
    """Whether the value holds a character that would end or split a header line (CR, LF,
    NUL: SPEC §5 header_injection). Three C-level scans: cheaper than a regex search, and
    a job checks every header variable of every recipient."""
    return "\r" in value or "\n" in value or "\x00" in value


def split_raw(raw: str) -> tuple[str, str]:
    """A raw RFC 5322 message -> (header block, body), line ends not yet normalised."""
    m = re.search(r"\r?\n\r?\n", raw)
    if m is None:
        return raw, ""
    return raw[: m.start()], raw[m.end():]
