"""Throttles: backoff curve, reply classes, warm-up and quotas with an injected clock; the
shipped rule files validate; real-socket bounds that cannot flake."""

from __future__ import annotations

import asyncio
import re
from importlib import resources
from typing import Any

import pytest

from mta.config import Backoff as BackoffConfig
from mta.config import ShapingRule, Warmup
from mta.policy.accounts import Account
from mta.policy.quota import allowance, consume
from mta.throttle.backoff import PATTERNS, Backoff, classify
from mta.throttle.limits import LocalLimits
from mta.throttle.shaping import BUILTIN, RuleBook
from mta.throttle.warmup import WarmupCounter
from mta.types import Reply

from .conftest import job, wait_for
from .sinks import Sink

T0 = 1_800_000_000.0  # a fixed "now" (2027-01-15)


@pytest.mark.parametrize("reply,category", [
    (Reply(421, "4.7.28 [1.2.3.4] Our system has detected an unusual rate of unsolicited mail"), "rate_limit"),
    (Reply(451, "4.7.28 rate limited"), "rate_limit"),
    (Reply(421, "4.7.0 [TSS04] Messages from 1.2.3.4 temporarily deferred due to unexpected volume"), "block"),
    (Reply(550, "5.7.1 Unfortunately, messages from [1.2.3.4] weren't sent. (RP-001)"), "block"),
    (Reply(451, "4.7.500 Server busy. Please try again later"), "rate_limit"),
    (Reply(421, "4.7.0 Too many concurrent SMTP connections from this IP"), "connections"),
    (Reply(450, "4.2.0 Greylisted, please try again in 300 seconds"), "greylist"),
    (Reply(554, "5.7.1 Service unavailable; client host blocked using zen.spamhaus.org"), "block"),
    (Reply(550, "5.1.1 User unknown"), None),
    (Reply(250, "2.0.0 OK"), None),
    (Reply(0, "4.4.2 connection lost"), None),
])
def test_reply_classes(reply: Reply, category: str | None) -> None:
    assert classify(reply) == category


def test_shipped_pattern_file_covers_the_big_providers() -> None:
    text = resources.files("mta").joinpath("data/backoff.toml").read_text()
    for needle in ("4.7.28", "TSS04", "RP-00"):
        assert needle in text
    assert all(p.comment for p in PATTERNS)


def test_backoff_curve_multiplicative_decrease_floor_and_additive_recovery() -> None:
    b = Backoff(min_fraction=0.1, hold=300.0, recovery_step=60.0)
    fractions = []
    for i in range(6):
        assert b.observe("rate_limit", T0 + i) == "cut"
        fractions.append(b.fraction)
    assert fractions == [0.5, 0.25, 0.125, 0.1, 0.1, 0.1]  # never below min_rate_fraction
    assert not b.recover(T0 + 5 + 59)  # not a whole step of clean answers yet
    assert b.recover(T0 + 5 + 60) and b.fraction == pytest.approx(0.2)
    assert b.recover(T0 + 5 + 60 * 9) and b.fraction == pytest.approx(1.0)  # one step per interval
    assert b.observe("greylist", T0 + 1000) is None and b.fraction == 1.0


def test_block_suspends_for_hold_then_recovers() -> None:
    limits = LocalLimits("mlgnserv.com", ShapingRule("p", (), ("p.test",), 4, 100, 10.0),
                         BackoffConfig(hold=300.0, min_rate_fraction=0.1, recovery_step=60.0))
    assert limits.acquire(T0) == 0.0
    assert limits.observe(Reply(421, "4.7.0 [TSS04] deferred"), T0) == "suspend"
    assert limits.acquire(T0 + 1) == pytest.approx(299.0)
    assert limits.current_rate == pytest.approx(5.0) and limits.max_connections == 2
    assert limits.acquire(T0 + 300) == 0.0
    limits.acquire(T0 + 300 + 60 * 5)
    assert limits.current_rate == pytest.approx(10.0)


def test_rate_precision_after_a_cut_with_an_injected_clock() -> None:
    limits = LocalLimits("mlgnserv.com", ShapingRule("p", (), ("p.test",), 4, 100, 20.0),
                         BackoffConfig(hold=1.0, min_rate_fraction=0.1, recovery_step=3600.0))
    limits.observe(Reply(421, "4.7.28 slow down"), T0)
    now, sent = T0, 0
    while now < T0 + 100:
        wait = limits.acquire(now)
        if wait == 0:
            sent += 1
        else:
            now += wait
    assert sent == pytest.approx(1000, rel=0.01)  # 10/s for 100 s, within 1 %


def test_unthrottled_provider_gets_a_rate_when_told_to_slow_down() -> None:
    limits = LocalLimits("mlgnserv.com", ShapingRule("p", (), ("p.test",), 4, 100, None))
    assert limits.current_rate is None
    limits.observe(Reply(421, "4.7.28 slow"), T0)
    assert limits.current_rate == pytest.approx(25.0)


def test_warmup_allowance_per_day() -> None:
    counter = WarmupCounter.of(Warmup("mlgn2ca.com", "2027-01-15", (3, 5)))
    day1 = counter.start + 3600
    assert [counter.acquire(day1) for _ in range(3)] == [0.0] * 3
    assert counter.acquire(day1) == pytest.approx(86400 - 3600)  # waits for tomorrow, not dropped
    day2 = counter.start + 86400 + 10
    assert sum(counter.acquire(day2) == 0.0 for _ in range(7)) == 5
    assert counter.allowance(counter.start + 2 * 86400) is None  # the plan is over: unlimited


def _account(**fields: Any) -> Account:
    base: dict[str, Any] = {"id": "a", "plan": "monthly", "subscribers": 10, "notify": "o@a.test",
                            "status": "active", "created": "2026-01-01"}
    base.update(fields)
    return Account(**base)


def test_quotas_monthly_trial_payg() -> None:
    monthly = _account()
    assert allowance(monthly, T0) == 1090
    used = consume(monthly, 1000, T0)
    assert allowance(used, T0) == 90 and allowance(used, T0 + 40 * 86400) == 1090  # a new month
    trial = _account(plan="trial", subscribers=1000, created="2027-01-10")
    assert allowance(consume(trial, 60, T0), T0) == 40 and not trial.trial_expired(T0)
    assert trial.trial_expired(T0 + 30 * 86400)
    payg = _account(plan="payg", subscribers=1000, credits=10)
    after = consume(payg, 8, T0)
    assert after.credits == 2 and allowance(after, T0) == 2


def test_shipped_shaping_rules_validate_and_cite_sources() -> None:
    text = resources.files("mta").joinpath("data/shaping.toml").read_text()
    blocks = re.split(r"^\[\[shaping\]\]$", text, flags=re.M)[1:]
    assert len(blocks) == len(BUILTIN) >= 7
    assert all(re.search(r"^#", b, re.M) for b in blocks), "every rule says where its figures come from"
    names = {r.provider for r in BUILTIN}
    assert {"google", "yahoo", "microsoft", "apple", "gmx-webde", "mailru", "yandex"} <= names
    book = RuleBook([])
    assert book.match("gmail.com", []).provider == "google"
    assert book.match("contoso.example", ["contoso-example.mail.protection.outlook.com"]).provider == "microsoft"
    own = ShapingRule("google", (), ("gmail.com",), 1, 1, 1.0)
    assert RuleBook([own]).match("gmail.com", []).max_connections == 1  # the operator's rule wins


# -- real sockets -----------------------------------------------------------------------------
async def test_rate_and_connection_limits_hold_at_the_receiver(daemon_factory: Any, sink: Sink) -> None:
    rule = {"provider": "slow", "match_domain": ["slow.test"], "max_connections": 2,
            "max_messages_per_connection": 100, "max_rate": "10/s"}
    d = await daemon_factory(static={"slow.test": [sink.addr]}, shaping=[rule])
    await d.account()
    await d.submit(job("r", [f"ok{i}@slow.test" for i in range(35)]))
    await wait_for(lambda: len(sink.delivered()) == 35, 30)
    times = sorted(m.at for m in sink.messages())
    worst = max(sum(1 for t in times if a <= t < a + 1.0) for a in times)
    assert worst <= 12  # 10/s plus a burst of 1, plus one for arrival jitter
    assert times[-1] - times[0] >= 3.0  # 35 messages at 10/s cannot take less than ~3.4 s
    assert sink.state.max_open <= 2


async def test_421_cuts_the_rate_and_nothing_is_lost(daemon_factory: Any) -> None:
    limited = Sink("127.0.0.8", defer_times=1).start()
    try:
        rule = {"provider": "lim", "match_domain": ["lim.test"], "max_connections": 2,
                "max_messages_per_connection": 100, "max_rate": "50/s"}
        d = await daemon_factory(static={"lim.test": [limited.addr]}, shaping=[rule])
        await d.account()
        rcpts = [f"rate{i}@lim.test" for i in range(6)] + [f"ok{i}@lim.test" for i in range(20)]
        await d.submit(job("b", rcpts))
        await wait_for(lambda: len(limited.delivered()) == len(rcpts), 40)
        state = d.app.status()["throttles"]
        lim = next(t for t in state if t["provider"] == "lim")
        assert lim["decisions"] >= 1 and lim["current_rate"] < 50
        assert all(n == 1 for n in limited.delivered().values())
    finally:
        limited.stop()


async def test_quota_exceeded_at_submission(daemon_factory: Any, sink: Sink) -> None:
    d = await daemon_factory(static={"d.test": [sink.addr]})
    await d.account("small", subscribers=1)  # monthly cap 109
    first = await d.submit(job("q1", [f"ok{i}@d.test" for i in range(100)], account="small"))
    assert first["accepted"] == 100
    over = await d.submit(job("q2", [f"ok{i}@d.test" for i in range(100, 110)], account="small"))
    assert over["error"]["code"] == "quota_exceeded" and over["fits"] == 9
    assert (await d.submit(job("q3", [f"ok{i}@d.test" for i in range(100, 109)], account="small")))["accepted"] == 9
    await d.stop()
    await d.start()  # counted durably across a restart
    again = await d.submit(job("q4", ["ok-last@d.test"], account="small"))
    assert again["error"]["code"] == "quota_exceeded" and again["fits"] == 0


async def test_warmup_holds_mail_over_the_daily_allowance(daemon_factory: Any, sink: Sink) -> None:
    import datetime

    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    extra = f'[[warmup]]\nsending_domain = "mlgn2ca.com"\nstart = "{today}"\ndaily = [5, 1000]\n'
    d = await daemon_factory(static={"d.test": [sink.addr]}, extra=extra)
    await d.account()
    await d.submit(job("w", [f"ok{i}@d.test" for i in range(8)], sending_domain="mlgn2ca.com"))
    await wait_for(lambda: len(sink.delivered()) == 5, 20)
    await asyncio.sleep(1.0)
    assert len(sink.delivered()) == 5  # the other 3 wait for tomorrow
    assert d.app.scheduler.depth()["ready"] + sum(1 for _ in d.app.scheduler.queues) >= 1


async def test_a_reload_lifts_a_throttle_at_once(daemon_factory: Any, sink: Sink) -> None:
    """Workers asleep on the old limit wake up with the new one: an operator who raises a
    rate does not wait for the old wait (here an hour) to run out."""
    rule = {"provider": "held", "match_domain": ["held.test"], "max_rate": "1/h", "max_connections": 2}
    d = await daemon_factory(static={"held.test": [sink.addr]}, shaping=[rule])
    await d.account()
    await d.submit(job("h", [f"ok{i}@held.test" for i in range(5)]))
    await wait_for(lambda: len(sink.delivered()) == 1, 10)  # the burst of one, then an hour's wait
    await asyncio.sleep(0.5)
    assert len(sink.delivered()) == 1
    d.config_path.write_text(d.config_path.read_text().replace('max_rate = "1/h"', 'max_rate = "100/s"'))
    assert d.app.reload()["reloaded"] is True
    await wait_for(lambda: len(sink.delivered()) == 5, 10)
