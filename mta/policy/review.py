"""Manual review of trial-account messages (SPEC §1, §2: `mta review list|approve|reject`).

A trial account's messages are spooled like any other, plus a row in the spool's `review`
table, and are kept out of the scheduler until an admin decides. The table is the only
state: nothing is held in memory, so a restart loses no decision and a review queue of
any size costs nothing until it is listed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from ..events import event_row, iso
from ..logs import get as get_logger
from ..queue.spool import Spool, append_events, leave_review, set_final
from ..template import Text, split_raw
from ..types import Content, JobInfo, State

log = get_logger("mta.policy")
ScheduleAdd = Callable[[JobInfo, Iterable[tuple[int, str]]], None]
_vars = msgspec.json.Decoder(dict[str, str])
_content = msgspec.json.Decoder(Content)
_SUBJECT = re.compile(r"(?im)^subject:[ \t]*(.*(?:\r?\n[ \t].*)*)")


def _subject(template: bytes, values: dict[str, str]) -> str:
    content = _content.decode(template)
    subject = content.subject
    if subject is None and content.raw is not None:
        found = _SUBJECT.search(split_raw(content.raw)[0])
        subject = " ".join(found.group(1).split()) if found else ""
    try:
        return Text(subject or "").render(values)
    except KeyError:
        return subject or ""


class ReviewDesk:
    def __init__(self, spool: Spool, schedule: ScheduleAdd, clock: Callable[[], float] = time.time):
        self.spool = spool
        self.schedule = schedule
        self.clock = clock

    def count(self) -> int:
        return self.spool.review_count()

    def waiting(self, account: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """`mta review list --json`: [{id, account, campaign, recipient, subject, queued_at}]."""
        out = []
        for rowid, _, acct, campaign, _, email, _, vars_blob, template, when in self.spool.review_items(
                account=account, limit=limit):
            out.append({"id": str(rowid), "account": acct, "campaign": campaign, "recipient": email,
                        "subject": _subject(bytes(template), _vars.decode(vars_blob or b"{}")),
                        "queued_at": iso(when)})
        return out

    def _items(self, ids: list[str] | None, account: str | None) -> list[tuple[Any, ...]]:
        if ids is None:
            if account is None:
                raise ValueError("name message ids, or --account ID --all")
            return self.spool.review_items(account=account, limit=1 << 30)
        rowids = []
        for value in ids:
            if not str(value).isdigit():
                raise ValueError(f"{value!r} is not a review id (see `mta review list`)")
            rowids.append(int(value))
        return self.spool.review_items(rowids=rowids, account=account, limit=len(rowids)) if rowids else []

    async def approve(self, ids: list[str] | None = None, account: str | None = None) -> dict[str, Any]:
        """Release messages to the scheduler; those already decided are skipped."""
        items = self._items(ids, account)
        released = set(await self.spool.transact(leave_review, [i[0] for i in items]))
        by_job: dict[int, list[tuple[int, str]]] = {}
        for rowid, job_row, _, _, _, _, domain, *_ in items:
            if rowid in released:
                by_job.setdefault(job_row, []).append((rowid, domain))
        for job_row, rows in by_job.items():
            job = self.spool.job(job_row)
            if job is not None:
                self.schedule(job, rows)
        log.info("policy", decision="review_approve", account=account, messages=len(released))
        return {"approved": len(released), "ids": [str(r) for r in sorted(released)]}

    async def reject(self, ids: list[str] | None = None, account: str | None = None) -> dict[str, Any]:
        """Drop messages from the queue, each with a `bounced` event so the campaign system knows."""
        items = self._items(ids, account)
        now = self.clock()
        events = [event_row("bounced", acct, {"campaign": campaign, "job_id": job_id, "recipient": email,
                                              "kind": "soft", "reason": "policyviolation",
                                              "code": "rejected in manual review", "review": "rejected"}, now)
                  for _, _, acct, campaign, job_id, email, *_ in items]
        rejected = await self.spool.transact(_reject, [i[0] for i in items], events)
        log.info("policy", decision="review_reject", account=account, messages=len(rejected))
        return {"rejected": len(rejected), "ids": [str(r) for r in sorted(rejected)]}


def _reject(conn: Any, rowids: list[int], events: list[tuple[float, str, str | None, bytes]]) -> list[int]:
    """Cancel the messages still waiting, with the events of those (one transaction)."""
    taken = leave_review(conn, rowids)
    keep = set(taken)
    set_final(conn, [(int(State.CANCELLED), r) for r in taken])
    append_events(conn, [e for rowid, e in zip(rowids, events, strict=True) if rowid in keep])
    return taken
