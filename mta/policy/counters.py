"""Campaign counters (SPEC §1): what the account policy judges a campaign by.

One `Campaign` per (account, campaign) in memory (a few thousand live campaigns at most),
made durable by deltas that ride in the same spool transaction as the outcome or return
they count: an outcome's delta is drained into the results batch (`take_writes`), a
return's delta is written with the return's own dedupe row (`signal_writes`). So a crash
can neither count a delivery whose outcome was lost nor lose the count of one that was
written, and a DSN sent twice is counted once.

`base` holds the counts at the account's last resume: an admin who resumes an account
has seen its rates, so a campaign is judged again on what happened since, with a fresh
minimum sample, instead of pausing again on the same bounces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..queue.spool import COUNT_FIELDS, Spool, add_counts, set_campaign_marks
from ..types import WriteOp

N = len(COUNT_FIELDS)
INDEX = {name: i for i, name in enumerate(COUNT_FIELDS)}


@dataclass(slots=True)
class Campaign:
    account: str
    campaign: str
    counts: list[int] = field(default_factory=lambda: [0] * N)
    base: list[int] = field(default_factory=lambda: [0] * N)
    warned: bool = False
    # cluster mode: what the other nodes counted, as of the last exchange with Redis
    others: list[int] = field(default_factory=lambda: [0] * N)

    def get(self, name: str) -> int:
        i = INDEX[name]
        return self.counts[i] + self.others[i]

    def totals(self) -> list[int]:
        return [a + b for a, b in zip(self.counts, self.others, strict=True)]

    def since_resume(self, name: str) -> int:
        i = INDEX[name]
        return self.counts[i] + self.others[i] - self.base[i]

    def rates(self) -> dict[str, float | None]:
        """The three rates of SPEC §1 over the campaign's whole life."""
        attempted, delivered = self.get("attempted"), self.get("delivered")
        return {
            "hard_bounce_rate": _ratio(self.get("hard"), attempted),
            "complaint_rate": _ratio(self.get("complaints"), delivered),
            "unsubscribe_rate": _ratio(self.get("unsubscribes"), delivered),
        }

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {"campaign": self.campaign}
        out.update({name: self.get(name) for name in COUNT_FIELDS})
        out.update({k: None if v is None else round(v, 6) for k, v in self.rates().items()})
        out["warned"] = self.warned
        return out


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole > 0 else None


class CampaignBook:
    def __init__(self, spool: Spool):
        self.spool = spool
        self.campaigns: dict[tuple[str, str], Campaign] = {}
        self.by_account: dict[str, set[str]] = {}
        self._pending: dict[tuple[str, str], list[int]] = {}
        self.on_bump: Callable[[Campaign], None] | None = None  # cluster mode: share the new counts

    def load(self) -> None:
        for row in self.spool.campaigns():
            account, name = row[0], row[1]
            c = self.get(account, name)
            c.counts = [int(v) for v in row[2:2 + N]]
            if row[2 + N] is not None:
                base = msgspec.json.decode(row[2 + N], type=list[int])
                c.base = (base + [0] * N)[:N]
            c.warned = bool(row[3 + N])

    def get(self, account: str, campaign: str) -> Campaign:
        key = (account, campaign)
        c = self.campaigns.get(key)
        if c is None:
            c = self.campaigns[key] = Campaign(account, campaign)
            self.by_account.setdefault(account, set()).add(campaign)
        return c

    def of_account(self, account: str) -> list[Campaign]:
        return [self.campaigns[(account, name)] for name in sorted(self.by_account.get(account, ()))]

    def forget(self, account: str) -> None:
        for name in self.by_account.pop(account, set()):
            self.campaigns.pop((account, name), None)
            self._pending.pop((account, name), None)

    # -- counting -------------------------------------------------------------------------
    def bump(self, c: Campaign, names: Iterable[str], durable_later: bool = True) -> None:
        """Count in memory; with durable_later the delta waits for `take_writes`."""
        pending = None
        if durable_later:
            key = (c.account, c.campaign)
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = [0] * N
        for name in names:
            i = INDEX[name]
            c.counts[i] += 1
            if pending is not None:
                pending[i] += 1
        if self.on_bump is not None:
            self.on_bump(c)

    def take_writes(self) -> list[WriteOp]:
        """The counted deltas, for the results batch that carries the outcomes behind them."""
        if not self._pending:
            return []
        rows = [(a, c, tuple(d)) for (a, c), d in self._pending.items()]
        self._pending = {}
        return [(add_counts, (rows,))]

    @staticmethod
    def delta_writes(c: Campaign, names: Iterable[str]) -> list[WriteOp]:
        deltas = [0] * N
        for name in names:
            deltas[INDEX[name]] += 1
        return [(add_counts, ([(c.account, c.campaign, tuple(deltas))],))] if any(deltas) else []

    # -- judging state ----------------------------------------------------------------------
    @staticmethod
    def marks_write(campaigns: Iterable[Campaign]) -> WriteOp:
        rows = [(c.account, c.campaign, msgspec.json.encode(c.base), int(c.warned)) for c in campaigns]
        return (set_campaign_marks, (rows,))
