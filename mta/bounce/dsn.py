"""RFC 3464 delivery status notifications: per-recipient fields.

A DSN's machine-readable part is `message/delivery-status`: one block of per-message
fields, then one block per recipient (Final-Recipient, Action, Status, Diagnostic-Code,
Remote-MTA). Some MTAs send the same fields as text/plain or inline in the body; those
are read from the text with the same field grammar.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message

from . import mime

_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)$")
_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")
_REPLY = re.compile(r"(?<![\d.])([245]\d\d)(?![\d.])")


@dataclass(slots=True)
class Report:
    """What a bounce says about one recipient."""

    recipient: str | None
    diagnostic: str = ""
    status: str | None = None
    action: str | None = None
    replycode: int | None = None
    command: str | None = None   # the SMTP command the error answered, when said
    diagnostic_type: str = ""    # "smtp", or e.g. "x-unix" for a local delivery program


def address(value: str) -> str | None:
    """The address in 'rfc822; <ann@example.test>' or '<ann@example.test>'; None if none."""
    if ";" in value:
        value = value.split(";", 1)[1]
    value = value.strip().strip("<>").strip().strip("<>").strip().strip('"')
    if "@" not in value or " " in value:
        m = re.search(r"[^\s<>\"'();:,\[\]]+@[A-Za-z0-9.\-\[\]]+[A-Za-z0-9\]]", value)
        return m.group(0).lower() if m else None
    return value.lower()


def _statuses(text: str) -> Iterator[str]:
    """The plausible enhanced status codes in a text, in order (subject 0..7)."""
    for m in _STATUS.finditer(text):
        klass, subject = m.group(1), int(m.group(2))
        if subject <= 7:
            yield f"{klass}.{subject}.{int(m.group(3))}"


def status_in(text: str) -> str | None:
    """The first plausible enhanced status code in a text."""
    return next(_statuses(text), None)


def last_status_in(text: str) -> str | None:
    """The last plausible enhanced status code in a text."""
    found = list(_statuses(text))
    return found[-1] if found else None


def reply_in(text: str) -> int | None:
    """The first SMTP reply code in a text (e.g. '550' of '550-5.1.1 ...')."""
    for m in _REPLY.finditer(text):
        return int(m.group(1))
    return None


Fields = list[tuple[str, str]]  # (lower-cased name, value) in order, repeats kept


def text_blocks(text: str) -> list[Fields]:
    """Field blocks separated by blank lines, continuation lines folded in."""
    blocks: list[Fields] = []
    current: Fields = []
    folding = False
    for line in text.split("\n"):
        if not line.strip():
            if current:
                blocks.append(current)
            current, folding = [], False
            continue
        if line[:1] in (" ", "\t") and folding:
            name, value = current[-1]
            current[-1] = (name, f"{value} {line.strip()}")
            continue
        m = _FIELD.match(line)
        folding = m is not None
        if m:
            current.append((m.group(1).lower(), m.group(2).strip()))
    if current:
        blocks.append(current)
    return blocks


def field_blocks(part: Message) -> list[Fields]:
    """The field blocks of a message/delivery-status or message/feedback-report part."""
    payload = part.get_payload()
    if not isinstance(payload, list):
        return text_blocks(mime.part_text(part))
    out: list[Fields] = []
    for block in payload:
        if isinstance(block, Message):
            out.append([(k.lower(), " ".join(str(v).split())) for k, v in block.items()])
    # compat32 splits on blank lines; a block can still hide more blocks in its body
    for block in payload:
        inner = block.get_payload() if isinstance(block, Message) else None
        if isinstance(inner, str):
            out.extend(text_blocks(inner))
    return out


def _first(fields: Fields) -> dict[str, str]:
    """A block as a mapping; a repeated field keeps its first value."""
    out: dict[str, str] = {}
    for name, value in fields:
        out.setdefault(name, value)
    return out


def _report(fields: dict[str, str]) -> Report | None:
    rcpt_field = fields.get("final-recipient") or fields.get("original-recipient") or ""
    if not rcpt_field and not fields.get("status") and not fields.get("diagnostic-code"):
        return None
    if not rcpt_field and "action" not in fields:
        return None
    diagnostic = fields.get("diagnostic-code", "")
    diagnostic_type = ""
    if ";" in diagnostic[:24]:  # 'smtp; 550 5.1.1 ...'
        diagnostic_type, _, diagnostic = diagnostic.partition(";")
        diagnostic_type, diagnostic = diagnostic_type.strip().lower(), diagnostic.strip()
    status = status_in(fields.get("status", "")) or None
    recipient = address(rcpt_field) if rcpt_field else None
    if recipient is None and status is None and not diagnostic:
        return None
    return Report(
        recipient=recipient,
        diagnostic=diagnostic,
        status=status,
        action=(fields.get("action") or "").lower().split(" ")[0] or None,
        replycode=reply_in(diagnostic[:12]) if diagnostic else None,
        diagnostic_type=diagnostic_type,
    )


# Fields that each recipient of a DSN has once: a repeat starts the next recipient's block
# (some MTAs write several recipients without the blank line between them).
_PER_RECIPIENT = frozenset({"original-recipient", "final-recipient", "action", "status", "remote-mta",
                            "diagnostic-code", "last-attempt-date", "will-retry-until", "final-log-id"})


def _per_recipient(fields: Fields) -> list[Fields]:
    blocks: list[Fields] = [[]]
    seen: set[str] = set()
    for name, value in fields:
        if name in _PER_RECIPIENT and name in seen:
            blocks.append([])
            seen = set()
        seen.add(name)
        blocks[-1].append((name, value))
    return blocks


def reports(msg: Message) -> list[Report]:
    """Per-recipient reports of the mail's delivery-status part(s), else of field-like text."""
    found: list[Report] = []
    for part in mime.walk(msg):
        if part.get_content_type() in ("message/delivery-status", "message/global-delivery-status"):
            for fields in field_blocks(part):
                for block in _per_recipient(fields):
                    rep = _report(_first(block))
                    if rep is not None:
                        found.append(rep)
    if not found:
        text = mime.body_text(msg)
        if re.search(r"^(final|original)-recipient\s*:", text, re.I | re.M):
            for fields in text_blocks(text):
                rep = _report(_first(fields))
                if rep is not None and rep.recipient:
                    found.append(rep)
    # Some MTAs give one block per recipient with Original- and Final-Recipient; dedupe
    seen: set[tuple[str | None, str | None, str]] = set()
    out = []
    for rep in found:
        key = (rep.recipient, rep.status, rep.diagnostic)
        if key not in seen:
            seen.add(key)
            out.append(rep)
    return out
