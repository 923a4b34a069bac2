"""The one rule set behind every classification: SMTP replies and bounce mails alike.

Rules are package data (`mta/data/bounce_rules.toml`) so that `mta bounce classify` runs
without a config; the order of evaluation is documented at the top of that file.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources

# x.1.y codes about something else than the mailbox: its domain (1.2, 1.10 null MX), a
# move (1.6), the sender (1.7, 1.8), a relay (1.9); the rest (1.1, 1.3, Exchange's 1.351, ...)
# say the mailbox address is wrong
_NOT_MAILBOX_DETAILS = frozenset({"1.2", "1.6", "1.7", "1.8", "1.9", "1.10"})
_BLANKS = re.compile(r"\s+")
# "550-5.7.1 ... 550 5.7.1 ..." continuation prefixes inside a multi-line reply
_CONTINUATION = re.compile(r"(?<=\s)[245]\d\d[- ](?:[245]\.\d{1,3}\.\d{1,3}\s)?")


@dataclass(frozen=True, slots=True)
class RuleSet:
    text: tuple[tuple[str, re.Pattern[str]], ...]
    weak: tuple[tuple[str, re.Pattern[str]], ...]
    status: dict[str, str]
    command: dict[str, str]
    hard: frozenset[str]
    list_domains: frozenset[str] = frozenset()
    list_reason: str = "rejected"
    strong_status: frozenset[str] = frozenset()
    unless_rcpt: dict[str, str] = field(default_factory=dict)
    blocklist: re.Pattern[str] | None = None

    def names_blocklist(self, text: str) -> bool:
        """Whether a reply or diagnostic names a DNS blocklist (the policy's blocklisting rule)."""
        return bool(text) and self.blocklist is not None and self.blocklist.search(text) is not None

    def _match(self, text: str, weak: bool = False) -> str | None:
        """The first rule whose pattern occurs in the text, by its (possibly tagged) name."""
        if not text:
            return None
        flat = _CONTINUATION.sub("", _BLANKS.sub(" ", text))
        for reason, pattern in self.weak if weak else self.text:
            if pattern.search(flat):
                return reason
        return None

    def by_text(self, text: str, weak: bool = False) -> str | None:
        """The first reason whose pattern occurs in the text (`weak`: the weak rules)."""
        reason = self._match(text, weak)
        return reason.partition("#")[0] if reason else None

    def by_status(self, status: str | None) -> str | None:
        """Reason of an enhanced status code by its subject.detail, if specific enough."""
        if not status:
            return None
        return self.status.get(status.split(".", 1)[1])

    def reason(self, diagnostic: str, status: str | None = None, command: str | None = None,
               context: str = "") -> str | None:
        """Reason for one failure; None when nothing at all points anywhere."""
        detail = status.split(".", 1)[1] if status else ""
        if detail in self.strong_status:
            return self.status[detail]
        tagged = self._match(diagnostic)
        # An address status makes the words a verdict on the address whatever the command;
        # without one, the command the words answered decides (before DATA: the rules below).
        address_status = detail.startswith("1.") and detail not in _NOT_MAILBOX_DETAILS
        if tagged in self.unless_rcpt and command in (None, "DATA") and not address_status:
            return self.unless_rcpt[tagged]
        reason = tagged.partition("#")[0] if tagged else None
        if command == "MAIL" and reason in (None, "userunknown", "hostunknown", "filtered"):
            # refused at MAIL FROM: the sender was refused, the recipient was never judged
            return "rejected"
        if reason is None and command in ("CONN", "HELO", "EHLO"):
            # refused before any address was given: the sending host was refused
            return self.command[command]
        return (reason or self.by_status(status) or self.by_text(diagnostic, weak=True)
                or self.by_text(context) or (self.command.get(command) if command else None)
                or self.by_text(context, weak=True))

    def kind(self, reason: str, temporary: bool = False) -> str:
        """hard only for reasons about the address itself (SPEC §7, sisimai's convention).

        A domain that accepts no mail (`notaccept`) is final only when the server said so
        with a permanent code: a 4xx null-MX or "not accepting" is a state that can pass.
        """
        if reason == "notaccept" and temporary:
            return "soft"
        return "hard" if reason in self.hard else "soft"


def load(data: bytes | None = None) -> RuleSet:
    """Compile the rule file (the packaged one unless `data` is given)."""
    if data is None:
        data = resources.files("mta.data").joinpath("bounce_rules.toml").read_bytes()
    doc = tomllib.loads(data.decode("utf-8"))
    text: list[tuple[str, re.Pattern[str]]] = []
    weak: list[tuple[str, re.Pattern[str]]] = []
    unless_rcpt: dict[str, str] = {}
    for index, rule in enumerate(doc.get("text", [])):
        # one alternation per rule: a single scan of the text per rule
        joined = "|".join(f"(?:{p})" for p in rule["patterns"])
        reason = rule["reason"]
        if "unless_rcpt" in rule:
            # a rule-specific name, so that the override applies to this rule's matches only
            reason = f"{reason}#{index}"
            unless_rcpt[reason] = rule["unless_rcpt"]
        (weak if rule.get("weak") else text).append((reason, re.compile(joined, re.I)))
    lists = doc.get("lists", {})
    blocklist_patterns = doc.get("blocklists", {}).get("patterns", [])
    blocklist = re.compile("|".join(f"(?:{p})" for p in blocklist_patterns), re.I) if blocklist_patterns else None
    return RuleSet(tuple(text), tuple(weak), dict(doc.get("status", {})), dict(doc.get("command", {})),
                   frozenset(doc.get("hard", [])), frozenset(lists.get("domains", [])),
                   lists.get("reason", "rejected"),
                   frozenset(doc.get("strong_status", {}).get("codes", [])), unless_rcpt,
                   blocklist=blocklist)


RULES = load()
