"""Bounces without a delivery-status part: the error paragraphs of Exim, qmail, Gmail,
Exchange, Domino, IMail and the many MTAs that only write prose.

They share a shape: a preamble, then per failed recipient its address and the remote
server's words, then a copy of the original message. The error section is cut before the
copy; each recipient's diagnostic is the text from its address to the next recipient's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .dsn import Report, reply_in, status_in

ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~\"-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                     r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+")

# Where the copy of the original message begins (the rest is not about the failure).
_ORIGINAL = re.compile(
    r"^\s*(?:[-=_*]{2,}.*)?(?:original message|copy of (?:the|your) message|header of the original|"
    r"original mail|message headers follow|headers of the original|returned message|undelivered message|"
    r"below this line is a copy|unsent message below|text of the message|content of the original|"
    r"included is a copy)|^\s*(?:received|return-path|dkim-signature|arc-seal|x-original-to|x-[\w-]+):\s",
    re.I | re.M)
_SENDER_CONTEXT = re.compile(r"(mail from:?|envelope-from|from:|sender:?|return-path:?)\s*<?\s*$", re.I)
# An address offered for help ("please contact <support@...>") is not a failed recipient,
# wherever else the notice repeats it.
_CONTACT_CONTEXT = re.compile(r"(contact|write to|send (an? )?(e-?mail|mail|message) to|questions?,? to|"
                              r"reach us at|help desk|helpdesk)\s*:?\s*<?\s*$", re.I)
_MESSAGE_ID = re.compile(r"^[0-9a-f.$-]{16,}@")  # timestamps and UUIDs: message ids, not mailboxes
_ROLE = re.compile(r"^(mailer-daemon|postmaster|mail-daemon|noreply|no-reply|bounce[s]?|root)@|"
                   r"^[^@]*-(ctl|request|help|subscribe|unsubscribe)@", re.I)
_REPLY_LINE = re.compile(r"(?:^|[\s:>'\"(\[])([45][0-5]\d)(?=[ -]|$)", re.M)
# The SMTP command an error answered. Explicit: a session transcript (">>> DATA") or the
# MTA saying which command it was ("in reply to RCPT TO command"); these are facts and
# win. Implied: words that only some commands' replies use ("recipient address rejected").
_EXPLICIT_COMMANDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("DATA", re.compile(r"^\s*>>> ?data\b|in reply to (end of )?data\b|\bsmtp:data\b|"
                        r"(after|for) (end of )?(data|text)( command)?\b|end of data", re.I | re.M)),
    ("RCPT", re.compile(r"^\s*>>> ?rcpt\b|in reply to rcpt\b|(after|for) rcpt[ _]to\b|\bsmtp:rcpt\b|"
                        r"does not like recipient", re.I | re.M)),
    ("MAIL", re.compile(r"^\s*>>> ?mail\b|in reply to mail\b|(after|for) mail from\b|\bsmtp:mail\b|"
                        r"does not like sender", re.I | re.M)),
)
_IMPLIED_COMMANDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("RCPT", re.compile(r">>> ?rcpt|rcpt[ _]to|rcpt command|did not like our rcpt|after rcpt", re.I)),
    ("MAIL", re.compile(r">>> ?mail from|mail from|sender address rejected|after mail", re.I)),
    ("DATA", re.compile(r">>> ?data\b|command\W{0,3}data\b|end of data|after data|data command|"
                        r"\bdata\b.{0,10}command|message text|end of message", re.I)),
    ("CONN", re.compile(r"initial connection|greeting|connect to|refused to talk|while connecting|banner", re.I)),
    ("HELO", re.compile(r"\b(helo|ehlo)\b", re.I)),
)


@dataclass(slots=True)
class Section:
    text: str
    recipients: list[str]


_DSN_FIELD = re.compile(r"^\s*(reporting-mta|final-recipient|original-recipient|action|status|remote-mta|"
                        r"last-attempt-date|arrival-date|received-from-mta|original-envelope-id|"
                        r"x-postfix-[\w-]+|will-retry-until)\s*:.*$", re.I | re.M)


def error_section(body: str) -> str:
    """The body up to where the copy of the original message begins, without DSN fields."""
    m = _ORIGINAL.search(body, 40 if len(body) > 40 else 0)
    return _DSN_FIELD.sub("", body[: m.start()] if m else body)


def recipients(section: str, exclude: set[str]) -> list[str]:
    """Failed recipients in order of appearance, without senders and role addresses."""
    found: list[str] = []
    contacts = {m.group(0).strip("\"'").lower() for m in ADDRESS.finditer(section)
                if _CONTACT_CONTEXT.search(section[max(0, m.start() - 40): m.start()])}
    exclude = exclude | contacts
    for m in ADDRESS.finditer(section):
        addr = m.group(0).strip("\"'").lower()
        if addr in exclude or addr in found or _ROLE.match(addr):
            continue
        if _SENDER_CONTEXT.search(section[max(0, m.start() - 20): m.start()]):
            continue
        if _MESSAGE_ID.match(addr) or "message-id" in section[max(0, m.start() - 16): m.start()].lower():
            continue
        found.append(addr)
    return found


def explicit_command_in(text: str) -> str | None:
    """The command a transcript or the MTA names as the one the error answered."""
    found = [(m.start(), name) for name, pattern in _EXPLICIT_COMMANDS if (m := pattern.search(text))]
    return min(found)[1] if found else None


def command_in(text: str) -> str | None:
    """The command the error answered: named explicitly, else implied by the words."""
    explicit = explicit_command_in(text)
    if explicit:
        return explicit
    for name, pattern in _IMPLIED_COMMANDS:
        if pattern.search(text):
            return name
    return None


def replycode_in(text: str) -> int | None:
    m = _REPLY_LINE.search(text)
    return int(m.group(1)) if m else reply_in(text)


def reports(body: str, exclude: set[str], failed: list[str]) -> list[Report]:
    """One report per failed recipient found in the error section."""
    section = error_section(body)
    rcpts = failed or recipients(section, exclude)
    lower = section.lower()
    # every mention of every recipient: a recipient's words run from its first mention to
    # the next mention of another one (bounces that repeat the list in a second language
    # or in a transcript mention each address more than once)
    mentions = sorted((m.start(), addr) for addr in rcpts for m in re.finditer(re.escape(addr), lower))
    out: list[Report] = []
    for addr in rcpts:
        pos = lower.find(addr)
        if pos < 0:
            pos = len(section)
        end = next((at for at, other in mentions if at > pos and other != addr), len(section))
        chunk = section[pos:end] if pos < len(section) else section
        # a recipient block that says nothing (a bare list of addresses) takes the section's words
        if not status_in(chunk) and not replycode_in(chunk) and len(chunk.strip()) < len(addr) + 8:
            chunk = section
        # the remote server's own words, when quoted, say more than the MTA's preamble
        reply = _REPLY_LINE.search(chunk)
        diagnostic = chunk[reply.start(1):] if reply else chunk
        out.append(Report(recipient=addr, diagnostic=diagnostic.strip(), status=status_in(chunk),
                          replycode=replycode_in(chunk), command=command_in(chunk)))
    return out
