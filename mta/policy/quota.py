"""Sending quotas from the terms (SPEC §1): monthly cap, trial allowance, pay-as-you-go credits.

Pure functions over an Account and a time. A submission takes from the quota at once
(in memory, before the spool write is awaited), so two pipelined jobs cannot both pass
a check that only one of them fits; the taken amount is given back if the write fails.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from .accounts import TRIAL_LIMIT, Account


def month_of(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m")


def allowance(account: Account, now: float) -> int:
    """How many more recipients the account may submit now."""
    sent_month = account.sent_this_month if account.month == month_of(now) else 0
    left = account.monthly_cap - sent_month
    if account.plan == "trial":
        left = min(left, TRIAL_LIMIT - account.sent_total)
    if account.plan == "payg":
        left = min(left, account.credits or 0)
    return max(0, left)


def consume(account: Account, n: int, now: float) -> Account:
    """The account after n more accepted recipients (n < 0 gives them back)."""
    month = month_of(now)
    sent_month = account.sent_this_month if account.month == month else 0
    credits = account.credits
    if account.plan == "payg":
        credits = (credits or 0) - n
    return msgspec.structs.replace(account, month=month, sent_this_month=max(0, sent_month + n),
                                   sent_total=max(0, account.sent_total + n), credits=credits)
