"""The provider's thresholds (SPEC §1) as one pure function over a campaign's counters.

Rates are per campaign and judged only once the campaign has `min_sample` distinct
recipients attempted (since the account's last resume), so one bounce in five is not a
pause. Blocklisting is judged per account and needs no sample: a handful of remote
replies naming a blocklist already costs the provider's IPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import Policy
from .counters import Campaign

# Decimal slack so that 4 of 50 "reaches" 8 % although 4 / 50 is not exactly 0.08 in binary.
EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Decision:
    action: str       # pause | warn
    rule: str         # hard_bounce_rate | abuse_complaint_rate | unsubscribe_rate | blocklisted
    campaign: str
    count: int        # bounces, complaints, unsubscribes or blocklist replies
    sample: int       # what the count is a share of (attempted or delivered); 0 for blocklisted
    threshold: float  # a rate, or a count for blocklisted

    @property
    def rate(self) -> float | None:
        return self.count / self.sample if self.sample else None

    def detail(self) -> dict[str, Any]:
        rate = self.rate
        return {"rule": self.rule, "campaign": self.campaign, "count": self.count, "sample": self.sample,
                "rate": None if rate is None else round(rate, 6), "threshold": self.threshold}


def judge(c: Campaign, *, hard_threshold: float, policy: Policy, account_blocklisted: int) -> Decision | None:
    """The pause or warning this campaign's counters call for now, if any.

    Pauses come first, the most damaging cause first: a blocklisting, then abuse
    complaints, then hard bounces, then unsubscribes. A warning is given once per campaign.
    """
    if account_blocklisted >= policy.blocklist_pause:
        return Decision("pause", "blocklisted", c.campaign, account_blocklisted, 0, policy.blocklist_pause)
    attempted = c.since_resume("attempted")
    if attempted < policy.min_sample:
        return None
    delivered = c.since_resume("delivered")
    hard = c.since_resume("hard")
    complaints = c.since_resume("complaints")
    unsubscribes = c.since_resume("unsubscribes")
    if delivered and complaints / delivered > policy.abuse_pause + EPSILON:
        return Decision("pause", "abuse_complaint_rate", c.campaign, complaints, delivered, policy.abuse_pause)
    if hard / attempted >= hard_threshold - EPSILON:
        return Decision("pause", "hard_bounce_rate", c.campaign, hard, attempted, hard_threshold)
    if delivered and unsubscribes / delivered > policy.unsubscribe_pause + EPSILON:
        return Decision("pause", "unsubscribe_rate", c.campaign, unsubscribes, delivered, policy.unsubscribe_pause)
    if not c.warned and hard / attempted >= policy.hard_bounce_warn - EPSILON:
        return Decision("warn", "hard_bounce_rate", c.campaign, hard, attempted, policy.hard_bounce_warn)
    return None
