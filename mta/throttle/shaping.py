"""Matching destinations to `[[shaping]]` rules (SPEC §3).

A destination domain is matched first by `match_domain` (the recipient domain or a parent
domain given with a leading dot), then by `match_mx` (suffixes of the MX host names, or
an exact host/IP), then falls to the rule with no match_* (the default). Without a
default rule, unmatched destinations are not throttled.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..config import ShapingRule

UNTHROTTLED = ShapingRule(provider="default", match_mx=(), match_domain=(), max_connections=20,
                          max_messages_per_connection=1000, max_rate=None)


def _domain_matches(domain: str, pattern: str) -> bool:
    if pattern.startswith("."):
        return domain.endswith(pattern) or domain == pattern[1:]
    return domain == pattern


def _mx_matches(host: str, pattern: str) -> bool:
    host = host.lower().rstrip(".")
    if pattern.startswith("."):
        return host.endswith(pattern)
    return host == pattern or host.endswith("." + pattern)


class RuleBook:
    def __init__(self, rules: Sequence[ShapingRule]):
        self.rules = tuple(r for r in rules if not r.is_default)
        self.default = next((r for r in rules if r.is_default), UNTHROTTLED)

    def match(self, domain: str, mx_hosts: Iterable[str]) -> ShapingRule:
        domain = domain.lower()
        for rule in self.rules:
            if any(_domain_matches(domain, p) for p in rule.match_domain):
                return rule
        hosts = list(mx_hosts)
        for rule in self.rules:
            if any(_mx_matches(h, p) for h in hosts for p in rule.match_mx):
                return rule
        return self.default
