"""Tolerant MIME access for bounce, ARF and reply mails.

Bounce mail is the most malformed mail there is: wrong charsets, broken boundaries, headers
folded by hand, 8-bit text in 7-bit parts. Everything here degrades to "no text" instead of
raising, because the listener must never fall over on what a receiver sent back.
"""

from __future__ import annotations

import email
import email.policy
import html
import re
from collections.abc import Iterator
from email.message import Message

_TAG = re.compile(r"<(script|style)\b.*?</\1>|<[^>]+>", re.I | re.S)
_BLANKS = re.compile(r"[ \t\r\f\v]+")


def parse(raw: bytes) -> Message:
    """The mail as a compat32 Message (the policy that never raises on bad headers)."""
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def header(msg: Message, name: str) -> str:
    """A header's value as text, decoded and unfolded; '' when absent or unreadable."""
    value = msg.get(name)
    if value is None:
        return ""
    try:
        parts = email.header.decode_header(str(value))
        text = "".join(p.decode(c or "latin-1", "replace") if isinstance(p, bytes) else p
                       for p, c in parts)
    except (LookupError, ValueError, TypeError):  # unknown charset, broken encoded word
        text = str(value)
    return " ".join(text.split())


def part_text(part: Message) -> str:
    """Decoded text of a leaf part; HTML reduced to its text."""
    try:
        payload = part.get_payload(decode=True)
    except (ValueError, TypeError, AssertionError):
        payload = None
    if not isinstance(payload, bytes):
        raw = part.get_payload()
        text = raw if isinstance(raw, str) else ""
    else:
        charset = part.get_content_charset() or "utf-8"
        try:
            text = payload.decode(charset, "replace")
        except LookupError:
            text = payload.decode("latin-1", "replace")
    if part.get_content_subtype() == "html":
        text = html.unescape(_TAG.sub(" ", text))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def walk(msg: Message) -> Iterator[Message]:
    """Every part, without descending into attached original messages."""
    yield msg
    if msg.get_content_maintype() == "message" and msg.get_content_subtype() in ("rfc822", "global"):
        return
    payload = msg.get_payload()
    if isinstance(payload, list):
        for sub in payload:
            if isinstance(sub, Message):
                yield from walk(sub)


def attached_message(msg: Message) -> Message | None:
    """The returned original message (message/rfc822 or text/rfc822-headers), if any."""
    for part in walk(msg):
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "message/global", "message/rfc822-headers"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
            if isinstance(payload, str):
                return parse(payload.encode("utf-8", "replace"))
        if ctype in ("text/rfc822-headers", "text/rfc822-header"):
            return parse(part_text(part).encode("utf-8", "replace"))
    return None


def body_text(msg: Message) -> str:
    """The human-readable text of the mail: its text parts outside attached messages."""
    plain: list[str] = []
    htmls: list[str] = []
    for part in walk(msg):
        if part.is_multipart():
            continue
        broken = part.get_content_maintype() == "multipart"  # no usable boundary: read as text
        if part.get_content_maintype() not in ("text", "") and not broken:
            continue
        if part.get_content_type() in ("text/rfc822-headers", "text/rfc822-header"):
            continue
        (htmls if part.get_content_subtype() == "html" else plain).append(part_text(part))
    return "\n".join(plain or htmls)


def squeeze(text: str) -> str:
    """Runs of blanks to one space, per line."""
    return "\n".join(_BLANKS.sub(" ", line).strip() for line in text.split("\n"))
