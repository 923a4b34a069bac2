"""The account policy at work (SPEC §1): counts every outcome and return per campaign,
judges the thresholds, pauses and warns, and sends the notices.

It listens on the two outcome paths (`Results` for delivery attempts, `Returns` for
asynchronous bounces, complaints and unsubscribes) and on account status changes, so a
pause by an admin gets the same notice and a resume the same fresh start as one made
here. Every decision is one structlog line (`policy`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from ..bounce.rules import RULES
from ..config import Policy
from ..events import event_row
from ..logs import get as get_logger
from ..queue.spool import Spool, append_events
from ..returns import Signal
from ..types import Classification, Disposition, Outcome, WriteOp
from .accounts import SYSTEM_ACCOUNT, Account, AccountBook
from .counters import Campaign, CampaignBook
from .notices import Notice, pause_notice, warning_notice
from .thresholds import Decision, judge

log = get_logger("mta.policy")
# ARF feedback types (SPEC §1): these count as abuse complaints, opt-out as an unsubscribe,
# the rest (auth-failure, not-spam) as neither.
ABUSE_FEEDBACK = frozenset({"abuse", "fraud", "virus", "other"})
# Only these raise a rate: a delivery or a further attempt can only lower one, so an
# outcome that moves none of them needs no judging (except the one that completes the sample).
RAISING = frozenset({"hard", "complaints", "unsubscribes", "blocklisted"})
_ANY_RATE = tuple(sorted(RAISING))
SendNotice = Callable[[str, str, Notice], Awaitable[None]]  # (account id, to, notice)


def signal_counts(s: Signal) -> list[str]:
    """The counters a return moves."""
    if s.type == "bounced":
        names = ["hard" if s.kind == "hard" else "soft"]
        if RULES.names_blocklist(s.code or ""):
            names.append("blocklisted")
        return names
    if s.type == "unsubscribed":
        return ["unsubscribes"]
    if s.type == "complained":
        feedback = s.feedback_type or "abuse"
        if feedback in ABUSE_FEEDBACK:
            return ["complaints"]
        if feedback == "opt-out":
            return ["unsubscribes"]
    return []


_FIRST_DELIVERED = ("attempted", "delivered")
_DELIVERED = ("delivered",)


def outcome_counts(d: Disposition, outcome: Outcome, cls: Classification | None) -> tuple[str, ...]:
    """The counters a delivery attempt moves: `attempted` once per recipient (its first try)."""
    first = d.row.attempts == 0
    if outcome is Outcome.DELIVERED:  # the common case, without building a list
        return _FIRST_DELIVERED if first else _DELIVERED
    names = ["attempted"] if first else []
    if outcome is not Outcome.DEFERRED:
        names.append("hard" if cls is not None and cls.kind == "hard" else "soft")
    # a deferral naming a blocklist is counted on the first try only: retries repeat the same block
    if (outcome is not Outcome.DEFERRED or first) and RULES.names_blocklist(d.reply.text):
        names.append("blocklisted")
    return tuple(names)


class PolicyEnforcer:
    def __init__(self, policy: Policy, accounts: AccountBook, campaigns: CampaignBook, spool: Spool,
                 send_notice: SendNotice | None = None, clock: Callable[[], float] = time.time):
        self.policy = policy
        self.accounts = accounts
        self.campaigns = campaigns
        self.spool = spool
        self.send_notice = send_notice
        self.clock = clock
        self._pausing: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the outcome paths ----------------------------------------------------------------
    def on_outcome(self, d: Disposition, outcome: Outcome, cls: Classification | None) -> None:
        """Results listener: counted in memory now, durable with the results batch."""
        job = d.row.job
        if job.account == SYSTEM_ACCOUNT:
            return
        names = outcome_counts(d, outcome, cls)
        if names:
            c = self.campaigns.get(job.account, job.campaign)
            self.campaigns.bump(c, names)
            self._judge(c, names)

    def signal_writes(self, s: Signal) -> list[WriteOp]:
        """Returns write hook: the counter deltas, written with the return itself."""
        names = signal_counts(s)
        if not names or s.account == SYSTEM_ACCOUNT:
            return []
        return CampaignBook.delta_writes(self.campaigns.get(s.account, s.campaign), names)

    def on_signal(self, s: Signal) -> None:
        """Returns listener (after the return and its deltas are durable)."""
        names = signal_counts(s)
        if not names or s.account == SYSTEM_ACCOUNT:
            return
        c = self.campaigns.get(s.account, s.campaign)
        self.campaigns.bump(c, names, durable_later=False)
        self._judge(c, names)

    # -- judging ----------------------------------------------------------------------------
    def rejudge(self, c: Campaign) -> None:
        """Cluster mode: other nodes' counts moved the campaign's totals."""
        self._judge(c, _ANY_RATE)

    def blocklisted_since_resume(self, account: str) -> int:
        return sum(c.since_resume("blocklisted") for c in self.campaigns.of_account(account))

    def _judge(self, c: Campaign, names: Sequence[str]) -> None:
        if RAISING.isdisjoint(names) and not (
                "attempted" in names and c.since_resume("attempted") == self.policy.min_sample):
            return
        account = self.accounts.get(c.account)
        if account is None or account.status != "active" or c.account in self._pausing:
            return
        now = self.clock()
        decision = judge(c, hard_threshold=account.threshold(now), policy=self.policy,
                         account_blocklisted=self.blocklisted_since_resume(c.account)
                         if c.get("blocklisted") else 0)
        if decision is None:
            return
        if decision.action == "pause":
            self._pausing.add(c.account)
            self._spawn(self._pause(account, decision))
        else:
            c.warned = True  # in memory now: the next outcome must not warn again
            self._spawn(self._warn(account, c, decision))

    async def _pause(self, account: Account, decision: Decision) -> None:
        try:
            log.warning("policy", decision="pause", account=account.id, campaign=decision.campaign,
                        rule=decision.rule, count=decision.count, sample=decision.sample,
                        rate=decision.rate, threshold=decision.threshold)
            await self.accounts.set_status(account.id, "paused", decision.rule, decision.detail())
        finally:
            self._pausing.discard(account.id)

    async def _warn(self, account: Account, c: Campaign, decision: Decision) -> None:
        detail = decision.detail()
        log.warning("policy", decision="warn", account=account.id, campaign=c.campaign, rule=decision.rule,
                    count=decision.count, sample=decision.sample, rate=decision.rate,
                    threshold=decision.threshold)
        marks_fn, marks_args = CampaignBook.marks_write([c])
        event = event_row("warned", account.id, dict(detail), self.clock())
        await self.spool.transact(_write_warning, [event], marks_fn, marks_args)
        notice = warning_notice(account.id, detail, account.threshold(self.clock()), self.policy.notice_from)
        await self._notify(account, notice)

    # -- account status changes ----------------------------------------------------------------
    def on_status(self, account: Account, old_status: str, local: bool = True) -> None:
        """AccountBook hook: a pause (ours or an admin's) sends the notice; a resume starts the
        account's campaigns on a fresh sample. A change another node made (cluster mode) is
        that node's to log and notify: here it only starts the fresh sample."""
        if not local:
            if account.status == "active" and old_status == "paused":
                self._fresh_sample(account.id)
            return
        if account.status == "paused":
            if account.pause_detail is None:  # by hand: the policy's own pauses logged already
                log.warning("policy", decision="pause", account=account.id, rule="admin",
                            reason=account.pause_reason)
            notice = pause_notice(account.id, account.pause_reason or "paused", account.pause_detail,
                                  self.policy.notice_from)
            self._spawn(self._notify(account, notice))
        elif account.status == "active" and old_status == "paused":
            campaigns = self._fresh_sample(account.id)
            log.info("policy", decision="resume", account=account.id, campaigns=campaigns)
        elif account.status == "active":
            log.info("policy", decision="approve", account=account.id, previous=old_status)

    def _fresh_sample(self, account_id: str) -> int:
        campaigns = self.campaigns.of_account(account_id)
        for c in campaigns:
            c.base = c.totals()
        if campaigns:
            fn, args = CampaignBook.marks_write(campaigns)
            self.spool.post(fn, *args)
        return len(campaigns)

    async def _notify(self, account: Account, notice: Notice) -> None:
        if self.send_notice is None:
            return
        try:
            await self.send_notice(account.id, account.notify, notice)
        except Exception as exc:  # the pause stands; the notice is logged as not sent
            log.error("notice_failed", account=account.id, kind=notice.kind, error=str(exc))
            return
        log.info("notice", account=account.id, kind=notice.kind, subject=notice.subject)

    # -- the campaign system's view ---------------------------------------------------------------
    def campaign_views(self, account: str) -> list[dict[str, Any]]:
        return [c.view() for c in self.campaigns.of_account(account)]

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("policy_task_failed", error=repr(task.exception()))


def _write_warning(conn: Any, events: list[tuple[float, str, str | None, bytes]],
                   marks_fn: Callable[..., None], marks_args: tuple[Any, ...]) -> None:
    append_events(conn, events)
    marks_fn(conn, *marks_args)
