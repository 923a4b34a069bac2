"""First SMTP reply classifier: kind (hard/soft) and a sisimai reason (SPEC §2, §7).

`hard` means the address itself is permanently undeliverable (userunknown, hostunknown,
hasmoved, notaccept); every other failure is `soft`, even a 5xx (sisimai's convention,
which the provider's hard-bounce threshold is about). Keyed on the RFC 3463 enhanced
status code first, then on the reply code and a few words of the text.
"""

from __future__ import annotations

import re

from ..types import Classification, Reply

HARD_REASONS = frozenset({"userunknown", "hostunknown", "hasmoved", "notaccept"})

# RFC 3463 subject.detail -> reason
_BY_STATUS: dict[str, str] = {
    "1.0": "userunknown", "1.1": "userunknown", "1.2": "hostunknown", "1.3": "userunknown",
    "1.4": "userunknown", "1.5": "userunknown", "1.6": "hasmoved", "1.7": "rejected", "1.8": "rejected",
    "1.10": "notaccept",
    "2.0": "mailboxfull", "2.1": "suspend", "2.2": "mailboxfull", "2.3": "exceedlimit", "2.4": "systemerror",
    "3.0": "systemerror", "3.1": "mailboxfull", "3.2": "systemerror", "3.3": "systemerror",
    "3.4": "mesgtoobig", "3.5": "systemerror",
    "4.0": "networkerror", "4.1": "networkerror", "4.2": "networkerror", "4.3": "networkerror",
    "4.4": "networkerror", "4.5": "networkerror", "4.6": "networkerror", "4.7": "expired",
    "5.0": "systemerror", "5.1": "systemerror", "5.2": "systemerror", "5.3": "toomanyconn",
    "5.4": "systemerror", "5.5": "systemerror",
    "6.0": "contenterror", "6.1": "contenterror", "6.2": "contenterror", "6.3": "contenterror",
    "6.4": "contenterror", "6.5": "contenterror", "6.6": "contenterror", "6.7": "syntaxerror",
    "7.0": "securityerror", "7.1": "rejected", "7.2": "securityerror", "7.3": "securityerror",
    "7.4": "securityerror", "7.5": "securityerror", "7.6": "securityerror", "7.7": "securityerror",
    "7.8": "securityerror", "7.9": "securityerror", "7.10": "securityerror", "7.11": "securityerror",
    "7.12": "securityerror", "7.13": "suspend", "7.14": "securityerror", "7.15": "securityerror",
    "7.16": "securityerror", "7.17": "securityerror", "7.18": "securityerror", "7.19": "securityerror",
    "7.20": "authfailure", "7.21": "authfailure", "7.22": "authfailure", "7.23": "authfailure",
    "7.24": "authfailure", "7.25": "requireptr", "7.26": "authfailure", "7.27": "notaccept",
    "7.28": "speeding",
}

_TEXT_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"spamhaus|barracuda|spamcop|blocklist|blacklist|block ?list|listed|\bdnsbl\b|\brbl\b", re.I),
     "blocked"),
    (re.compile(r"user unknown|unknown user|no such user|does not exist|mailbox unavailable|"
                r"recipient address rejected|invalid recipient|unknown recipient", re.I), "userunknown"),
    (re.compile(r"mailbox (is )?full|over ?quota|quota exceeded|insufficient storage", re.I), "mailboxfull"),
    (re.compile(r"rate limit|too many (messages|emails)|unusual rate|try again later", re.I), "speeding"),
    (re.compile(r"too many connections", re.I), "toomanyconn"),
    (re.compile(r"spam|unsolicited", re.I), "spamdetected"),
    (re.compile(r"relay", re.I), "norelaying"),
    (re.compile(r"too (large|big)|size limit|message size", re.I), "mesgtoobig"),
    (re.compile(r"connection (lost|refused|timed out|reset)|timeout|failed", re.I), "networkerror"),
]


def classify_reply(reply: Reply) -> Classification:
    """Kind and reason of a failed reply (4xx, 5xx or no reply at all)."""
    status = reply.enhanced
    for pattern, reason in _TEXT_RULES[:1]:
        if pattern.search(reply.text):
            return Classification("soft", reason)
    if status:
        by_status = _BY_STATUS.get(status.split(".", 1)[1])
        if by_status is not None:
            hard = by_status in HARD_REASONS and status.startswith("5")
            return Classification("hard" if hard else "soft", by_status)
    for pattern, reason in _TEXT_RULES[1:]:
        if pattern.search(reply.text):
            hard = reason in HARD_REASONS and 500 <= reply.code < 600
            return Classification("hard" if hard else "soft", reason)
    if reply.code == 0:
        return Classification("soft", "networkerror")
    return Classification("soft", "undefined" if reply.code >= 500 else "systemerror")
