"""Account policy (SPEC §1): thresholds judged from real deliveries and real listener
traffic, pauses that hold mail (also across a restart) with a notice, warnings, the
blocklisting rule, manual review of trial mail, and the pure pieces behind them."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
from typing import Any

import pytest

from mta.config import Policy
from mta.policy.counters import Campaign
from mta.policy.enforce import outcome_counts, signal_counts
from mta.policy.notices import pause_notice, warning_notice
from mta.policy.thresholds import judge
from mta.returns import Signal
from mta.types import Classification, Disposition, JobInfo, Outcome, RecipientRow, Reply

from .conftest import Daemon, job, poll_events, wait_for
from .mails import arf, dsn
from .sinks import Received, Sink
from .test_listener import send

POLICY = Policy(min_sample=20)


def campaign(**counts: int) -> Campaign:
    c = Campaign("acme", "c1")
    for name, n in counts.items():
        c.counts[["attempted", "delivered", "hard", "soft", "complaints", "unsubscribes", "blocklisted"]
                 .index(name)] = n
    return c


# -- pure pieces ----------------------------------------------------------------------------
def test_nothing_is_judged_below_the_minimum_sample() -> None:
    assert judge(campaign(attempted=19, hard=19), hard_threshold=0.08, policy=POLICY, account_blocklisted=0) is None
    decision = judge(campaign(attempted=20, hard=2), hard_threshold=0.08, policy=POLICY, account_blocklisted=0)
    assert decision is not None and decision.action == "pause" and decision.rule == "hard_bounce_rate"
    assert decision.rate == 0.1 and decision.detail()["threshold"] == 0.08


def test_each_threshold_and_its_edge() -> None:
    def rule(c: Campaign, threshold: float = 0.15) -> tuple[str, str] | None:
        d = judge(c, hard_threshold=threshold, policy=Policy(min_sample=200), account_blocklisted=0)
        return (d.action, d.rule) if d else None

    # hard bounces: the pause threshold is reached (>=), the 8 % warning for everyone
    assert rule(campaign(attempted=200, delivered=200, hard=16), 0.08) == ("pause", "hard_bounce_rate")
    assert rule(campaign(attempted=200, delivered=200, hard=15), 0.08) is None
    assert rule(campaign(attempted=200, delivered=200, hard=16)) == ("warn", "hard_bounce_rate")
    assert rule(campaign(attempted=200, delivered=200, hard=30)) == ("pause", "hard_bounce_rate")
    # abuse complaints and unsubscribes: the rate must exceed, over delivered messages
    assert rule(campaign(attempted=200, delivered=200, complaints=1)) is None
    assert rule(campaign(attempted=200, delivered=200, complaints=2)) == ("pause", "abuse_complaint_rate")
    assert rule(campaign(attempted=200, delivered=200, unsubscribes=2)) is None
    assert rule(campaign(attempted=200, delivered=200, unsubscribes=3)) == ("pause", "unsubscribe_rate")
    # a warned campaign is not warned twice
    warned = campaign(attempted=200, delivered=200, hard=16)
    warned.warned = True
    assert rule(warned) is None


def test_resume_gives_a_fresh_sample_and_blocklisting_needs_none() -> None:
    c = campaign(attempted=50, delivered=40, hard=10)
    c.base = list(c.counts)  # resumed here
    assert judge(c, hard_threshold=0.08, policy=POLICY, account_blocklisted=0) is None
    c.counts[0] += 20
    c.counts[2] += 5
    d = judge(c, hard_threshold=0.08, policy=POLICY, account_blocklisted=0)
    assert d is not None and (d.count, d.sample) == (5, 20)
    d = judge(campaign(attempted=1), hard_threshold=0.08, policy=POLICY, account_blocklisted=5)
    assert d is not None and d.rule == "blocklisted" and d.count == 5


def test_what_counts_as_what() -> None:
    job_info = JobInfo(1, "acme", "j", "c1", "mlgnserv.com", 0.0)

    def d(attempts: int, code: int, text: str) -> Disposition:
        row = RecipientRow(1, job_info, 0, "a@b.test", "b.test", {}, attempts)
        return Disposition(row, Outcome.DELIVERED, Reply(code, text), "p")

    assert outcome_counts(d(0, 250, "ok"), Outcome.DELIVERED, None) == ("attempted", "delivered")
    assert outcome_counts(d(1, 250, "ok"), Outcome.DELIVERED, None) == ("delivered",)  # after a deferral
    assert outcome_counts(d(0, 451, "later"), Outcome.DEFERRED, None) == ("attempted",)
    hard = Classification("hard", "userunknown")
    assert outcome_counts(d(0, 550, "5.1.1 no such user"), Outcome.BOUNCED, hard) == ("attempted", "hard")
    block = d(0, 554, "5.7.1 blocked using zen.spamhaus.org")
    assert outcome_counts(block, Outcome.BOUNCED, Classification("soft", "blocked")) == \
        ("attempted", "soft", "blocklisted")
    assert outcome_counts(d(2, 451, "listed at spamcop"), Outcome.DEFERRED, None) == ()  # a retry repeats it

    def sig(stype: str, feedback: str | None = None) -> list[str]:
        return signal_counts(Signal(stype, "acme", "c1", "h", kind="hard", feedback_type=feedback))

    assert sig("complained", "abuse") == sig("complained", "fraud") == sig("complained", "other") == ["complaints"]
    assert sig("complained", "opt-out") == sig("unsubscribed") == ["unsubscribes"]
    assert sig("complained", "not-spam") == sig("complained", "auth-failure") == []
    assert sig("bounced") == ["hard"]


def test_notices_name_campaign_rate_threshold_and_next_steps() -> None:
    detail = {"rule": "hard_bounce_rate", "campaign": "nov", "count": 10, "sample": 50, "rate": 0.2,
              "threshold": 0.08}
    notice = pause_notice("acme", "hard_bounce_rate", detail, "Compliance <c@mlgnserv.com>")
    assert "acme" in notice.subject and "nov" in notice.subject
    for words in ("20.0 %", "8.0 %", "10 hard bounces of 50", "kept, not deleted", "What to do next",
                  "suppression list"):
        assert words in notice.text, words
    abuse = pause_notice("acme", "abuse_complaint_rate", {**detail, "rule": "abuse_complaint_rate", "count": 2,
                                                          "sample": 200, "rate": 0.01, "threshold": 0.005},
                         "C")
    assert "2 abuse complaints of 200" in abuse.text and "0.5 %" in abuse.text and "do not share" in abuse.text
    admin = pause_notice("acme", "unpaid invoice", None, "C")
    assert "unpaid invoice" in admin.text and "What to do next" in admin.text
    warning = warning_notice("acme", {**detail, "rate": 0.1, "count": 5, "threshold": 0.08}, 0.15, "C")
    assert warning.kind == "warning" and "10.0 %" in warning.text and "15.0 %" in warning.text


# -- over real sockets ------------------------------------------------------------------------
def notices_to(sink: Sink, address: str) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(r.data, policy=email.policy.default)  # type: ignore[misc]
            for r in sink.messages() if r.rcpt.lower() == address]


async def policy_daemon(daemon_factory: Any, sink: Sink, notify: Sink, min_sample: int = 20,
                        **config: Any) -> Daemon:
    static = {"d.test": [sink.addr], "acme.test": [notify.addr], **config.pop("static", {})}
    return await daemon_factory(static=static, extra=f"[policy]\nmin_sample = {min_sample}\n", **config)


async def status(d: Daemon, account: str = "acme") -> str:
    assert d.app is not None
    found = d.app.accounts.get(account)
    assert found is not None
    return found.status


async def test_hard_bounces_pause_hold_mail_across_a_restart_and_resume_releases_it(
        daemon_factory: Any, sink: Sink, sink2: Sink) -> None:
    slow = Sink("127.0.0.4", stall=3.0).start()  # one connection, busy 3 s: the rest is queued behind
    try:
        d = await policy_daemon(daemon_factory, sink, sink2, static={"s.test": [slow.addr]},
                                shaping=[{"provider": "slow", "match_domain": ["s.test"], "max_connections": 1},
                                         {"provider": "default", "max_connections": 10}])
        await d.account()
        lane = ["slow0@s.test"] + [f"ok{i}@s.test" for i in range(1, 8)]
        assert (await d.submit(job("lane", lane, campaign="c2")))["accepted"] == 8
        bad = [f"{'hard' if i % 5 == 0 else 'ok'}{i}@d.test" for i in range(20)]  # 20 % hard
        assert (await d.submit(job("bad", bad, campaign="c1")))["accepted"] == 20
        [paused] = await poll_events(d, "paused", 1)
        assert paused["reason"] == "hard_bounce_rate" and paused["campaign"] == "c1"
        assert (paused["count"], paused["sample"], paused["threshold"]) == (4, 20, 0.08)
        assert d.app is not None
        shown = await d.app.control_service.accounts_show({"id": "acme"})
        assert shown["status"] == "paused" and shown["pause_detail"]["rate"] == 0.2
        [c1] = [c for c in shown["campaigns"] if c["campaign"] == "c1"]
        assert (c1["attempted"], c1["delivered"], c1["hard"], c1["hard_bounce_rate"]) == (20, 16, 4, 0.2)
        # the notice: at once, to the notify address, from policy.notice_from, not marketing mail
        [notice] = await wait_for(lambda: notices_to(sink2, "owner@acme.test"), 10)
        assert notice["From"] == "Mailigen Compliance <compliance@mlgnserv.com>"
        assert notice["Auto-Submitted"] == "auto-generated" and notice["List-Unsubscribe"] is None
        body = notice.get_content()
        assert "c1" in body and "20.0 %" in body and "8.0 %" in body and "@d.test" not in body
        # held: a new job is refused, the queued lane does not move on
        refused = await d.submit(job("more", ["ok99@d.test"], campaign="c3"))
        assert refused["error"]["code"] == "account_paused"
        await wait_for(lambda: slow.delivered()["slow0@s.test"], 10)
        await asyncio.sleep(0.5)
        assert sum(slow.delivered().values()) == 1
        # ... and still held after a restart; counters survive it too
        await d.stop()
        await d.start()
        assert d.app is not None and d.app.scheduler.depth()["held"] == 7
        shown = await d.app.control_service.accounts_show({"id": "acme"})
        assert shown["status"] == "paused" and [c["attempted"] for c in shown["campaigns"]] == [20, 1]
        await asyncio.sleep(0.5)
        assert sum(slow.delivered().values()) == 1
        await d.app.control_service.accounts_resume({"id": "acme"})
        await wait_for(lambda: sum(slow.delivered().values()) == 8, 30)
        assert max(slow.delivered().values()) == 1
        assert [e["type"] for e in await d.events() if e["type"] in ("paused", "resumed")] == ["paused", "resumed"]
        # a fresh sample after the resume: a late DSN for c1 does not pause again
        got = {r.rcpt: r for r in sink.messages()}
        verp = got["ok1@d.test"].mail_from
        await send(d, "", [verp], dsn(verp, "ok1@d.test"))
        await poll_events(d, "bounced", 5)
        await asyncio.sleep(0.3)
        assert await status(d) == "active"
    finally:
        slow.stop()


async def delivered_campaign(d: Daemon, sink: Sink, n: int = 20, **fields: Any) -> dict[str, Received]:
    await d.account(**fields)
    rcpts = [f"ok{i}@d.test" for i in range(n)]
    assert (await d.submit(job("c", rcpts, campaign="c1")))["accepted"] == n
    await wait_for(lambda: all(sink.delivered()[r] for r in rcpts), 20)
    return {r.rcpt: r for r in sink.messages()}


def original(r: Received) -> bytes:
    return b"Return-Path: <" + r.mail_from.encode() + b">\r\n" + r.data


async def test_abuse_reports_pause_and_other_feedback_does_not(daemon_factory: Any, sink: Sink,
                                                                sink2: Sink) -> None:
    d = await policy_daemon(daemon_factory, sink, sink2)
    got = await delivered_campaign(d, sink)
    # not-spam and auth-failure reports count as neither (SPEC §1)
    for i, feedback in ((1, "not-spam"), (2, "auth-failure")):
        await send(d, "fbl@isp.test", ["fbl@mlgnserv.com"], arf(original(got[f"ok{i}@d.test"]), feedback_type=feedback))
    await poll_events(d, "complained", 2)
    await asyncio.sleep(0.3)
    assert await status(d) == "active"
    # one abuse report in 20 delivered is 5 % > 0.5 %
    await send(d, "fbl@isp.test", ["fbl@mlgnserv.com"], arf(original(got["ok3@d.test"])))
    [paused] = await poll_events(d, "paused", 1)
    assert paused["reason"] == "abuse_complaint_rate" and (paused["count"], paused["sample"]) == (1, 20)
    [notice] = await wait_for(lambda: notices_to(sink2, "owner@acme.test"), 10)
    assert "ok3" not in notice.as_string() and "abuse-complaint rate" in notice.get_content()


async def test_asynchronous_dsns_pause(daemon_factory: Any, sink: Sink, sink2: Sink) -> None:
    d = await policy_daemon(daemon_factory, sink, sink2)
    got = await delivered_campaign(d, sink)  # 20 delivered, a new account: its threshold is 8 %
    first = got["ok1@d.test"].mail_from
    await send(d, "", [first], dsn(first, "ok1@d.test"))
    await send(d, "", [first], dsn(first, "ok1@d.test"))  # a receiver resending its DSN counts once
    await poll_events(d, "bounced", 1)
    await asyncio.sleep(0.3)
    assert await status(d) == "active"  # 1 of 20 is 5 %
    second = got["ok2@d.test"].mail_from
    await send(d, "", [second], dsn(second, "ok2@d.test"))
    [paused] = await poll_events(d, "paused", 1)
    assert paused["reason"] == "hard_bounce_rate" and (paused["count"], paused["sample"]) == (2, 20)


async def test_unsubscribe_mails_pause(daemon_factory: Any, sink: Sink, sink2: Sink) -> None:
    d = await policy_daemon(daemon_factory, sink, sink2)
    got = await delivered_campaign(d, sink)
    msg = email.message_from_bytes(got["ok4@d.test"].data)
    mailto = re.search(r"<mailto:([^?>]+)", msg["List-Unsubscribe"]).group(1)  # type: ignore[union-attr]
    await send(d, "ok4@d.test", [mailto], b"From: ok4@d.test\r\nSubject: unsubscribe\r\n\r\nplease\r\n")
    [paused] = await poll_events(d, "paused", 1)
    assert paused["reason"] == "unsubscribe_rate"


async def test_below_the_sample_nothing_pauses_and_a_warning_is_given_once(
        daemon_factory: Any, sink: Sink, sink2: Sink) -> None:
    d = await policy_daemon(daemon_factory, sink, sink2)
    # an established account (threshold 15 %): 10 % hard bounces warn, and do not pause
    await d.account(created="2020-01-01")
    few = [f"hard{i}@d.test" for i in range(10)]  # 100 % hard, but only 10 of a sample of 20
    assert (await d.submit(job("few", few, campaign="small")))["accepted"] == 10
    await poll_events(d, "bounced", 10)
    rcpts = [f"{'hard' if i < 2 else 'ok'}{i}x@d.test" for i in range(20)]
    assert (await d.submit(job("warn", rcpts, campaign="c1")))["accepted"] == 20
    [warned] = await poll_events(d, "warned", 1)
    assert warned["campaign"] == "c1" and warned["rate"] == 0.1 and warned["threshold"] == 0.08
    [notice] = await wait_for(lambda: notices_to(sink2, "owner@acme.test"), 10)
    assert notice["Subject"].startswith("Warning") and "15.0 %" in notice.get_content()
    more = [f"ok{i}y@d.test" for i in range(5)]
    assert (await d.submit(job("warn2", more, campaign="c1")))["accepted"] == 5
    await wait_for(lambda: all(sink.delivered()[r] for r in more), 10)
    await asyncio.sleep(0.3)
    assert await status(d) == "active" and len(await d.events("warned")) == 1


async def test_blocklist_replies_pause_past_a_small_count(daemon_factory: Any, sink: Sink, sink2: Sink) -> None:
    d = await policy_daemon(daemon_factory, sink, sink2, min_sample=1000)
    await d.account()
    rcpts = [f"block{i}@d.test" for i in range(4)]
    assert (await d.submit(job("b1", rcpts, campaign="c1")))["accepted"] == 4
    await poll_events(d, "bounced", 4)
    await asyncio.sleep(0.3)
    assert await status(d) == "active"  # four is not yet "past a small count" (5)
    # the provider is suspended for mlgnserv.com now (adaptive backoff): the fifth goes via mlgn2ca.com;
    # the count is the account's, across campaigns and sending domains
    answer = await d.submit(job("b2", ["block9@d.test"], campaign="c2", sending_domain="mlgn2ca.com"))
    assert answer["accepted"] == 1
    [paused] = await poll_events(d, "paused", 1)
    assert paused["reason"] == "blocklisted" and paused["count"] == 5


async def test_trial_mail_waits_for_review(daemon_factory: Any, sink: Sink, sink2: Sink) -> None:
    d = await policy_daemon(daemon_factory, sink, sink2)
    await d.account(plan="trial", subscribers=100)
    rcpts = [f"ok{i}@d.test" for i in range(4)]
    answer = await d.submit(job("t1", rcpts, campaign="trial"))
    assert answer["accepted"] == 4 and answer["held_for_review"] is True
    assert d.app is not None
    await asyncio.sleep(0.3)
    assert not sink.messages()
    # the list survives a restart
    await d.stop()
    await d.start()
    review = d.app.review
    items = review.waiting()
    assert [i["recipient"] for i in items] == rcpts and items[0]["subject"] == "Hello ok0"
    assert set(items[0]) == {"id", "account", "campaign", "recipient", "subject", "queued_at"}
    assert (await review.approve([items[0]["id"]]))["approved"] == 1
    assert (await review.approve([items[0]["id"]]))["approved"] == 0  # decided once
    await wait_for(lambda: sink.delivered()["ok0@d.test"], 10)
    assert (await review.reject([items[1]["id"]]))["rejected"] == 1
    [rejected] = await poll_events(d, "bounced", 1)
    assert rejected["recipient"] == "ok1@d.test" and rejected["review"] == "rejected"
    assert (await review.approve(None, account="acme"))["approved"] == 2
    await wait_for(lambda: sink.delivered()["ok3@d.test"] and sink.delivered()["ok2@d.test"], 10)
    await asyncio.sleep(0.3)
    assert "ok1@d.test" not in sink.delivered() and review.waiting() == []
    with pytest.raises(ValueError):
        await review.approve(["not-an-id"])
    # the trial's allowance is 100 messages in total, rejected ones included
    over = await d.submit(job("t2", [f"more{i}@d.test" for i in range(97)], campaign="trial"))
    assert over["error"]["code"] == "quota_exceeded" and over["fits"] == 96
