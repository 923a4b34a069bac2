"""The submit socket's operations (SPEC §4): ping, submit, events, event.

Admission order for a job: decodes as a job -> the account exists -> idempotency (the
same job_id returns its first answer, even if the account was paused since) -> account
status -> managed sending domain -> content checks -> spooled durably -> acknowledged.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from .. import metrics
from ..config import Config
from ..events import event_row
from ..events import read as read_events
from ..jsonlines import Invalid, Peer, error
from ..memory import trim_soon
from ..policy.accounts import SYSTEM_ACCOUNT, AccountBook
from ..policy.notices import Notice
from ..policy.quota import allowance, consume
from ..queue.scheduler import Scheduler
from ..queue.spool import Spool, SpoolUnavailable, insert_job
from ..returns import Returns, Signal
from ..types import Content, JobInfo
from .job import AnyJob, JobIn, LargeJobIn, LooseJobIn, Refused, job_digest, prepare, split_address

_encode = msgspec.json.encode
_decode = msgspec.json.decode
TRIM_AFTER = 1000  # recipients in a job worth giving memory back for


class _JobId(msgspec.Struct):
    """Just the job_id of a line that is not a valid job (for the error answer)."""

    job_id: Any = None


_decode_job_id = msgspec.json.Decoder(_JobId).decode


class HeldKey(Protocol):
    node: str
    digest: str  # hex; empty while the holder is still accepting
    answer: bytes


class JobKeys(Protocol):
    """Cluster mode (sharing/jobs.py): a job_id accepted once across the nodes."""

    async def claim(self, account: str, job_id: str) -> HeldKey | None: ...
    async def accepted(self, account: str, job_id: str, digest: bytes, answer: bytes) -> None: ...
    async def abandon(self, account: str, job_id: str) -> None: ...


class SubmitService:
    def __init__(self, config: Config, spool: Spool, accounts: AccountBook, scheduler: Scheduler,
                 address_hash: Callable[[str], str], returns: Returns,
                 clock: Callable[[], float] = time.time):
        self.returns = returns
        self.config = config
        self.spool = spool
        self.accounts = accounts
        self.scheduler = scheduler
        self.address_hash = address_hash
        self.clock = clock
        self.read_up_to = 0  # the highest cursor a reader has asked to read after (event-feed lag)
        self._notices = itertools.count(1)  # two notices in one millisecond still get their own job_id
        self.job_keys: JobKeys | None = None

    async def handle(self, request: dict[str, Any] | AnyJob | Invalid, peer: Peer) -> dict[str, Any]:
        # submit lines always arrive typed (App wires decode_job for the op): a job or Invalid
        if isinstance(request, JobIn | LooseJobIn | LargeJobIn):  # decoded straight into its struct
            return self._counted(await self.submit_job(request))
        if isinstance(request, Invalid):  # a submit line that is JSON but not a job
            job_id = _decode_job_id(request.line).job_id
            return self._counted(error("malformed_request", f"not a valid job: {request.message}",
                                       job_id=job_id if isinstance(job_id, str) else None))
        op = request["op"]
        if op == "ping":
            return {"ok": True}
        if op == "events":
            return self.events(request)
        if op == "event":
            return await self.report(request)
        return error("unknown_op", f"unknown op {op!r} (ping, submit, events, event)")

    @staticmethod
    def _counted(answer: dict[str, Any]) -> dict[str, Any]:
        if answer.get("ok") is False:
            metrics.SUBMIT_ERRORS.labels(answer["error"]["code"]).inc()
        return answer

    def events(self, request: dict[str, Any]) -> dict[str, Any]:
        after, limit = request.get("after", 0), request.get("limit", 1000)
        if after is None:
            after = 0
        if isinstance(after, bool) or not isinstance(after, int) or isinstance(limit, bool) \
                or not isinstance(limit, int) or after < 0 or limit < 1 or after > 2**62:
            return error("malformed_request", "after must be a cursor >= 0 and limit a number >= 1")
        self.read_up_to = max(self.read_up_to, after)
        return read_events(self.spool, after, min(limit, 2**31))

    async def report(self, request: dict[str, Any]) -> dict[str, Any]:
        """An unsubscribe or complaint the campaign system received itself (SPEC §4)."""
        etype, account, campaign, address = (request.get(k) for k in ("type", "account", "campaign", "email"))
        if etype not in ("unsubscribed", "complained"):
            return error("malformed_request", "type must be unsubscribed or complained")
        if not all(isinstance(v, str) and v for v in (account, campaign, address)):
            return error("malformed_request", "account, campaign and email are required strings")
        assert isinstance(account, str) and isinstance(address, str)
        if self.accounts.get(account) is None:
            return error("unknown_account", f"no account {account!r}")
        assert isinstance(campaign, str)
        address = address.strip().lower()
        signal = Signal(etype, account, campaign, self.address_hash(address),
                        None if etype == "complained" else address,  # SPEC §8: never the complainer
                        feedback_type="abuse" if etype == "complained" else None, source="campaign_system")
        try:
            await self.returns.record(signal)
        except SpoolUnavailable as exc:
            return error("unavailable", str(exc))
        return {"ok": True}

    async def submit_job(self, job: AnyJob) -> dict[str, Any]:
        account = self.accounts.get(job.account)
        if account is None:
            return error("unknown_account", f"no account {job.account!r} (create it with `mta accounts set`)",
                         job_id=job.job_id)
        try:
            digest = job_digest(job)  # a large job's recipients are first decoded here
        except Refused as exc:
            return error(exc.code, exc.message, job_id=job.job_id)
        found = self.spool.find_job(job.account, job.job_id)
        if found is not None:
            return self._replay(job.job_id, digest, *found)
        if self.job_keys is None:
            return await self._admit(job, digest)
        # cluster mode: the job_id is claimed across the nodes first, so that a job another
        # node accepted is replayed, even if the account was paused since
        held = await self.job_keys.claim(job.account, job.job_id)
        if held is not None:
            if not held.digest:
                return error("unavailable", f"job_id {job.job_id!r} is being accepted by node {held.node}; "
                             "retry shortly", job_id=job.job_id)
            return self._replay(job.job_id, digest, bytes.fromhex(held.digest), held.answer)
        answer = await self._admit(job, digest)
        if answer.get("ok") is True:  # before the answer goes out: the next node asked must find it
            await self.job_keys.accepted(job.account, job.job_id, digest, _encode(answer))
        else:
            await self.job_keys.abandon(job.account, job.job_id)
        return answer

    async def _admit(self, job: AnyJob, digest: bytes) -> dict[str, Any]:
        """Everything after idempotency: status, domain, content, quota, then the spool."""
        account = self.accounts.get(job.account)
        if account is None:
            return error("unknown_account", f"no account {job.account!r}", job_id=job.job_id)
        if account.status == "paused":
            return error("account_paused", f"account {job.account} is paused ({account.pause_reason})",
                         job_id=job.job_id)
        if account.status == "suspended":
            return error("account_suspended", f"account {job.account} is suspended", job_id=job.job_id)
        now = self.clock()
        if account.trial_expired(now):
            return error("trial_expired", f"the 30-day trial of {job.account} is over (since {account.created})",
                         job_id=job.job_id)
        sending_domain = job.sending_domain.lower()
        if sending_domain not in self.config.sending_domains:
            return error("unmanaged_sending_domain",
                         f"{job.sending_domain!r} is not one of {', '.join(self.config.sending_domains)}",
                         job_id=job.job_id)
        try:
            prepared = prepare(job, max_recipients=self.config.max_recipients_per_job,
                               max_message_size=self.config.max_message_size, address_hash=self.address_hash,
                               digest=digest, suppressed=self.returns.suppression.is_suppressed)
        except Refused as exc:
            return error(exc.code, exc.message, job_id=job.job_id)
        fits = allowance(account, now)
        if prepared.count > fits:
            return error("quota_exceeded", f"{prepared.count} recipients; {fits} would have fitted in the "
                         f"account's quota ({account.plan} plan)", job_id=job.job_id, fits=fits)
        charged = consume(account, prepared.count, now)
        self.accounts.replace(charged)  # taken now: a pipelined job cannot pass the same check
        review = account.plan == "trial"  # SPEC §1: every trial message waits for an admin
        answer: dict[str, Any] = {"ok": True, "job_id": job.job_id, "accepted": prepared.count,
                                  "rejected": prepared.rejected}
        if review:
            answer["held_for_review"] = True
        answer_blob = _encode(answer)
        campaign = job.campaign or job.job_id
        event = event_row("accepted", job.account, {"campaign": campaign, "job_id": job.job_id,
                                                    "recipients": prepared.count,
                                                    "rejected": len(prepared.rejected)}, now)
        try:
            status, job_row, first, old_digest, old_answer = await self.spool.transact(
                insert_job, job.account, job.job_id, campaign, sending_domain, prepared.digest,
                _encode(prepared.content), answer_blob, now, prepared.rows(), event, _encode(charged), review)
        except SpoolUnavailable as exc:
            self._give_back(job.account, prepared.count, now)
            return error("unavailable", f"{exc}; retry later", job_id=job.job_id)
        if status == "exists":  # the same job_id won a race inside one group commit
            self._give_back(job.account, prepared.count, now)
            return self._replay(job.job_id, digest, old_digest, old_answer)
        if not review:
            info = JobInfo(job_row, job.account, job.job_id, campaign, sending_domain, now)
            self.scheduler.add(info, enumerate(prepared.domains, first))  # (row id, domain)
        metrics.SUBMITTED_JOBS.inc()
        metrics.SUBMITTED_RECIPIENTS.inc(prepared.count)
        if prepared.count + len(prepared.rejected) >= TRIM_AFTER:
            trim_soon()  # a big job's decoding is garbage now: give its pages back
        for rejection in prepared.rejected:
            metrics.REJECTED_RECIPIENTS.labels(str(rejection["code"])).inc()
        return answer

    async def submit_notice(self, account_id: str, to: str, notice: Notice) -> None:
        """Queue a policy notice: the daemon's own account, so no pause, review or quota holds it
        (SPEC §1: sent at once), and transactional (no List-Unsubscribe, no footer)."""
        parts = split_address(to)
        if parts is None:
            raise ValueError(f"the notify address {to!r} of account {account_id} is not an address")
        now = self.clock()
        policy = self.config.policy
        domain = policy.notice_address.rpartition("@")[2].lower()
        sending_domain = domain if domain in self.config.sending_domains else next(iter(self.config.sending_domains))
        content = Content(from_=policy.notice_from, subject=notice.subject, text=notice.text,
                          headers={"Auto-Submitted": "auto-generated", "X-Mta-Notice": notice.kind,
                                   "X-Mta-Account": account_id}, transactional=True)
        job_id = f"notice-{account_id}-{notice.kind}-{int(now * 1000)}-{next(self._notices)}"
        email = f"{parts[0]}@{parts[1]}"
        rows = [(0, email, parts[1], msgspec.Raw(b"{}"), self.address_hash(email.lower()))]
        event = event_row("accepted", SYSTEM_ACCOUNT, {"campaign": "notices", "job_id": job_id, "recipients": 1,
                                                       "rejected": 0, "notice_for": account_id}, now)
        blob = _encode(content)
        _, job_row, first, _, _ = await self.spool.transact(
            insert_job, SYSTEM_ACCOUNT, job_id, "notices", sending_domain, hashlib.sha256(blob).digest(), blob,
            _encode({"ok": True, "job_id": job_id, "accepted": 1, "rejected": []}), now, rows, event)
        if job_row:
            info = JobInfo(job_row, SYSTEM_ACCOUNT, job_id, "notices", sending_domain, now)
            self.scheduler.add(info, [(first, parts[1])])

    def _give_back(self, account_id: str, n: int, now: float) -> None:
        current = self.accounts.get(account_id)
        if current is not None:
            self.accounts.replace(consume(current, -n, now))

    @staticmethod
    def _replay(job_id: str, digest: bytes, old_digest: bytes, old_answer: bytes) -> dict[str, Any]:
        if digest != old_digest:
            return error("duplicate_job", f"job_id {job_id!r} was already used for a different job",
                         job_id=job_id)
        first: dict[str, Any] = _decode(old_answer)
        return first
