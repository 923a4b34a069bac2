"""Warm-up plans (SPEC §3 [[warmup]]): a new sending domain's daily volume follows a schedule.

Day 1 of the plan is the `start` date (UTC); day N allows `daily[N-1]` messages; past the
end of the list the domain is unlimited. Mail over the day's allowance waits for the next
day: it is never dropped. The day's count is persisted, so a restart does not reset it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from ..config import Warmup

DAY = 86400.0


def _day_start(now: float) -> float:
    return now - now % DAY


@dataclass(slots=True)
class WarmupCounter:
    plan: Warmup
    start: float  # UTC midnight of the plan's first day
    day: float = 0.0  # UTC midnight of the day `sent` counts
    sent: int = 0
    on_change: Callable[[WarmupCounter], None] | None = None

    @classmethod
    def of(cls, plan: Warmup) -> WarmupCounter:
        try:
            start = datetime.strptime(plan.start, "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
        except ValueError:
            start = 0.0
        return cls(plan, start)

    def allowance(self, now: float) -> int | None:
        """Messages allowed today, or None once the plan is over (unlimited)."""
        index = max(0, int((_day_start(now) - self.start) // DAY))
        if index >= len(self.plan.daily):
            return None
        return self.plan.daily[index]

    def acquire(self, now: float) -> float:
        """Take one message of today's allowance (0.0), or return seconds until tomorrow."""
        today = _day_start(now)
        if today != self.day:
            self.day, self.sent = today, 0
        allowed = self.allowance(now)
        if allowed is not None and self.sent >= allowed:
            return today + DAY - now
        self.sent += 1
        if self.on_change is not None:
            self.on_change(self)
        return 0.0

    def give_back(self) -> None:
        self.sent = max(0, self.sent - 1)
