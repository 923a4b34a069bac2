"""Adaptive backoff: what a receiver's reply means for the sending rate (issue 4, SPEC §3, §6).

Replies are classified by a data file of patterns (`mta/data/backoff.toml`). Rate-limit
replies cut the (sending domain, provider) rate multiplicatively; blocks suspend the
provider for `backoff.hold`; the rate never falls below `backoff.min_rate_fraction` of
the rule's rate, and it climbs back one additive step per `backoff.recovery_step` of
clean answers (AIMD, as TCP does for the same reason: back off fast, probe back slowly).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources

from ..types import Reply

CATEGORIES = ("rate_limit", "connections", "block", "greylist")
DECREASE = 0.5  # multiplicative decrease per rate-limit reply
STEP = 0.1  # additive increase per recovery step, as a share of the rule's rate


@dataclass(frozen=True, slots=True)
class Pattern:
    category: str
    code: int | None
    enhanced: str | None
    text: re.Pattern[str] | None
    comment: str

    def matches(self, reply: Reply) -> bool:
        if self.code is not None and reply.code != self.code:
            return False
        if self.enhanced is not None and reply.enhanced != self.enhanced:
            return False
        return self.text is None or self.text.search(reply.text) is not None


def load_patterns(text: str | None = None) -> tuple[Pattern, ...]:
    """The shipped patterns (or those in `text`); raises ValueError on a malformed entry."""
    if text is None:
        text = resources.files("mta").joinpath("data/backoff.toml").read_text()
    out = []
    for i, entry in enumerate(tomllib.loads(text).get("pattern", [])):
        category = entry.get("category")
        if category not in CATEGORIES:
            raise ValueError(f"pattern[{i}].category: {category!r} is not one of {CATEGORIES}")
        if not any(k in entry for k in ("code", "enhanced", "text")):
            raise ValueError(f"pattern[{i}]: needs code, enhanced or text")
        if not entry.get("comment"):
            raise ValueError(f"pattern[{i}]: needs a comment saying where it comes from")
        regex = re.compile(entry["text"], re.I) if "text" in entry else None
        out.append(Pattern(category, entry.get("code"), entry.get("enhanced"), regex, entry["comment"]))
    return tuple(out)


PATTERNS = load_patterns()


def classify(reply: Reply, patterns: tuple[Pattern, ...] = PATTERNS) -> str | None:
    """The backoff category of a reply, or None for a reply that asks nothing of the sender."""
    if 200 <= reply.code < 300 or reply.code == 0:
        return None
    for pattern in patterns:
        if pattern.matches(reply):
            return pattern.category
    return None


@dataclass(slots=True)
class Backoff:
    """The AIMD state of one (sending domain, provider). Times are the caller's clock."""

    min_fraction: float = 0.1
    hold: float = 300.0
    recovery_step: float = 60.0
    fraction: float = 1.0  # share of the rule's rate currently allowed
    suspended_until: float = 0.0
    last_change: float = 0.0
    decisions: int = 0

    def observe(self, category: str | None, now: float) -> str | None:
        """Apply a classified reply; returns the decision taken ('cut', 'suspend') or None."""
        if category in ("rate_limit", "connections"):
            self.fraction = max(self.min_fraction, self.fraction * DECREASE)
            self.last_change = now
            self.decisions += 1
            return "cut"
        if category == "block":
            self.fraction = max(self.min_fraction, self.fraction * DECREASE)
            self.suspended_until = max(self.suspended_until, now + self.hold)
            self.last_change = now
            self.decisions += 1
            return "suspend"
        return None

    def recover(self, now: float) -> bool:
        """One additive step per clean recovery interval; True when the fraction changed."""
        if self.fraction >= 1.0 or now < self.suspended_until:
            return False
        since = max(self.last_change, self.suspended_until)
        steps = int((now - since) // self.recovery_step)
        if steps <= 0:
            return False
        self.fraction = min(1.0, self.fraction + steps * STEP)
        self.last_change = since + steps * self.recovery_step
        return True

    def wait(self, now: float) -> float:
        return max(0.0, self.suspended_until - now)
