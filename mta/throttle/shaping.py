"""Matching destinations to `[[shaping]]` rules (SPEC §3).

A destination domain is matched first by `match_domain` (the recipient domain or a parent
domain given with a leading dot), then by `match_mx` (suffixes of the MX host names, or
an exact host/IP), then falls to the rule with no match_* (the default). Without a
default rule, unmatched destinations are not throttled.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Sequence
from importlib import resources

from ..config import ConfigError, ShapingRule, parse_config

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


def builtin_rules(text: str | None = None) -> tuple[ShapingRule, ...]:
    """The provider rules shipped as package data (`mta/data/shaping.toml`), validated with
    the same code as the operator's [[shaping]] rules."""
    if text is None:
        text = resources.files("mta").joinpath("data/shaping.toml").read_text()
    data = tomllib.loads(text)
    try:
        return parse_config({"sending_domains": {"x.test": {}}, "shaping": data.get("shaping", [])}).shaping
    except ConfigError as exc:
        raise ConfigError(f"built-in shaping rules: {exc}") from None


BUILTIN = builtin_rules()


class RuleBook:
    """Operator rules first, then the built-in provider rules (unless the operator has a rule
    with the same provider name), then the operator's default rule."""

    def __init__(self, rules: Sequence[ShapingRule], builtin: Sequence[ShapingRule] = BUILTIN):
        own = tuple(r for r in rules if not r.is_default)
        names = {r.provider for r in own}
        self.rules = own + tuple(r for r in builtin if not r.is_default and r.provider not in names)
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
