"""Cluster mode (SPEC §10) against a real redis-server: the scripts with an injected clock,
then two daemons with separate spools sharing one Redis."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mta import metrics
from mta.cluster.link import ClusterLink
from mta.cluster.scripts import COUNTS, GCRA, LEASE
from mta.config import ConfigError, ShapingRule
from mta.throttle.shared import SharedLimits

from .conftest import Daemon, RedisServer, job, wait_for, write_config
from .sinks import Sink


async def _link(server: RedisServer, node: str) -> ClusterLink:
    link = ClusterLink(server.url, node)
    await link.start()
    assert link.up
    return link


# -- the scripts, on an injected clock ----------------------------------------------------------
async def test_gcra_script_holds_rate_and_burst_for_two_nodes(redis_server: RedisServer) -> None:
    a, b = await _link(redis_server, "a"), await _link(redis_server, "b")
    try:
        rule = ShapingRule(provider="p", match_domain=("p.test",), match_mx=(), max_connections=4,
                           max_messages_per_connection=100, max_rate=100.0)
        la = SharedLimits("mlgnserv.com", rule, a, server_clock=False)
        lb = SharedLimits("mlgnserv.com", rule, b, server_clock=False)
        taken = {"a": 0, "b": 0}
        t0 = 1_000_000.0
        order = [("a", la), ("b", lb)]
        coin = random.Random(7)
        for step in range(2000):  # 2 s in 1 ms steps, both nodes asking every step, in a random order
            now = t0 + step / 1000.0
            for name, limits in order if coin.random() < 0.5 else order[::-1]:
                if await limits.reserve(now) == 0.0:
                    taken[name] += 1
        total = taken["a"] + taken["b"]
        # 100/s over 2 s plus the burst (5 = 50 ms of the rate): never more, and not much less
        assert 195 <= total <= 200 + 5
        assert taken["a"] > 50 and taken["b"] > 50  # shared, not one node starving the other
        await la.reserve(t0 + 2.0)
        wait = await la.reserve(t0 + 2.0)
        assert wait == pytest.approx(0.01, abs=0.002)  # a refusal says how long until the next cell
    finally:
        await a.close()
        await b.close()


async def test_lease_and_counts_scripts(redis_server: RedisServer) -> None:
    link = await _link(redis_server, "n1")
    try:
        keys = [link.key("conns", "test"), link.key("wants", "test")]
        now = 5_000_000.0

        async def lease(lease_id: str, at: float) -> list[int]:
            return [int(x) for x in await link.script(LEASE, keys, [lease_id, lease_id.split(":")[0], 2, at,
                                                                    1000, 300])]

        assert await lease("x:1", now) == [1, 2, 0]
        assert await lease("x:2", now) == [1, 2, 0]  # alone: the whole limit
        assert await lease("y:1", now + 10) == [0, 1, 0]  # both slots held; y now wants one
        assert await lease("x:1", now + 20) == [1, 1, 1]  # renewal: x learns its fair share is 1 of 2
        assert await lease("x:3", now + 30) == [0, 1, 1]  # and may not grow while y waits
        assert await lease("y:1", now + 1001) == [1, 1, 0]  # x:2 lapsed (never renewed): y takes it
        assert await lease("z:1", now + 1002) == [0, 1, 0]  # x:1 (renewed at +20) and y:1 hold both

        ckey = link.key("campaign", "acct", "camp")
        assert await link.script(COUNTS, [ckey], ["n1", 60, 10, 2]) == [10, 2]
        assert await link.script(COUNTS, [ckey], ["n2", 60, 5, 1]) == [15, 3]
        assert await link.script(COUNTS, [ckey], ["n1", 60, 12, 2]) == [17, 3]  # absolute, not added
        assert await link.script(COUNTS, [ckey], ["n1", 60, 12, 2]) == [17, 3]  # idempotent
        assert float(await link.script(GCRA, [link.key("r")], [1000.0, 0.0, now])) == 0.0
        assert float(await link.script(GCRA, [link.key("r")], [1000.0, 0.0, now + 1])) == pytest.approx(999.0)
    finally:
        await link.close()


# -- two daemons ----------------------------------------------------------------------------------
Pair = tuple[Daemon, Daemon]
RULE = {"provider": "thr", "match_domain": ["thr.test"], "max_connections": 2,
        "max_messages_per_connection": 1000, "max_rate": "20/s"}


@pytest.fixture
async def pair(tmp_path: Path, redis_server: RedisServer, sink: Sink) -> AsyncIterator[Pair]:
    extra = f'[cluster]\nredis_url = "{redis_server.url}"\n'
    static = {"thr.test": [sink.addr], "ok.test": [sink.addr]}
    nodes = []
    for name in ("a", "b"):
        home = tmp_path / name
        home.mkdir()
        (home / "token.key").write_text("the-cluster-shares-one-token-key\n")  # as every node must
        nodes.append(Daemon(write_config(home, static=static, shaping=[RULE], extra=extra)))
    for node in nodes:
        await node.start()
    await nodes[0].account()  # created on node a only: node b learns it from the cluster
    await wait_for(lambda: nodes[1].app is not None and nodes[1].app.accounts.get("acme"), 5)
    yield nodes[0], nodes[1]
    for node in nodes:
        await node.stop()


def _app(d: Daemon) -> Any:
    assert d.app is not None
    return d.app


async def test_a_providers_rate_holds_across_both_nodes(pair: Pair, sink: Sink) -> None:
    a, b = pair
    await a.submit(job("ra", [f"a{i}@thr.test" for i in range(50)]))
    await b.submit(job("rb", [f"b{i}@thr.test" for i in range(50)]))
    await wait_for(lambda: len(sink.delivered()) == 100, 40)
    times = sorted(m.at for m in sink.messages())
    # 100 messages at 20/s (burst 1) cannot take less than 99/20 s, whichever node sent them
    assert times[-1] - times[0] >= 99 / 20 * 0.95
    worst = max(sum(1 for t in times if x <= t < x + 1.0) for x in times)
    assert worst <= 22  # 20/s plus the burst, plus one for arrival jitter
    assert sink.state.max_open <= 2  # the rule's connections, across both nodes
    a_times = [m.at for m in sink.messages() if m.rcpt.startswith("a")]
    b_times = [m.at for m in sink.messages() if m.rcpt.startswith("b")]
    assert min(b_times) < max(a_times)  # fair shares: node b did not wait for node a to finish
    assert all(n == 1 for n in sink.delivered().values())


async def test_a_pause_on_one_node_holds_on_the_other_and_notifies_once(pair: Pair) -> None:
    a, b = pair
    await _app(a).accounts.set_status("acme", "paused", "admin")
    await wait_for(lambda: _app(b).accounts.get("acme").status == "paused", 5)
    refused = await b.submit(job("after-pause", ["x@ok.test"]))
    assert refused["error"]["code"] == "account_paused"
    assert _app(b).accounts.is_held("acme")
    await asyncio.sleep(0.5)
    notices_a = [e for e in await a.events("accepted") if e.get("account") == "_mta"]
    notices_b = [e for e in await b.events("accepted") if e.get("account") == "_mta"]
    assert len(notices_a) == 1 and notices_b == []  # the notice goes out once, from node a
    assert len(await a.events("paused")) == 1 and await b.events("paused") == []
    await _app(b).accounts.set_status("acme", "active")  # and back, from the other side
    await wait_for(lambda: _app(a).accounts.get("acme").status == "active", 5)


async def test_one_job_id_is_accepted_once_across_nodes(pair: Pair, sink: Sink) -> None:
    a, b = pair
    one = job("same-1", [f"s1-{i}@ok.test" for i in range(10)])
    first = await a.submit(one)
    second = await b.submit(one)
    assert first["ok"] is True and second == first

    two = job("same-2", [f"s2-{i}@ok.test" for i in range(10)])

    async def submit(d: Daemon) -> dict[str, Any]:
        for _ in range(20):
            answer = await d.submit(two)
            if answer.get("error", {}).get("code") != "unavailable":
                return answer
            await asyncio.sleep(0.2)
        raise AssertionError("still unavailable")

    answers = await asyncio.gather(submit(a), submit(b))
    assert all(x["ok"] is True for x in answers)
    await wait_for(lambda: len(sink.delivered()) == 20, 20)
    await asyncio.sleep(0.5)
    assert all(n == 1 for n in sink.delivered().values())
    changed = dict(two, subject="another")
    assert (await b.submit(changed))["error"]["code"] == "duplicate_job"


async def test_suppression_is_shared_without_addresses(pair: Pair, redis_server: RedisServer) -> None:
    a, b = pair
    answer = await a.submit({"op": "event", "type": "unsubscribed", "account": "acme", "campaign": "c",
                             "email": "gone@ok.test"})
    assert answer["ok"] is True
    rhash = _app(a).signer.address_hash("gone@ok.test")
    await wait_for(lambda: _app(b).returns.is_suppressed("acme", rhash), 5)
    refused = await b.submit(job("to-gone", ["gone@ok.test", "here@ok.test"]))
    assert refused["accepted"] == 1 and refused["rejected"][0]["code"] == "suppressed"
    import redis

    client = redis.Redis(port=redis_server.port)
    stored = client.hgetall("mta:suppression")
    client.close()
    assert stored and not any(b"gone@" in k + v for k, v in stored.items())  # hashes only


async def test_campaign_counts_are_summed_across_nodes(pair: Pair, sink: Sink) -> None:
    a, b = pair
    await a.submit(job("ca", [f"ca{i}@ok.test" for i in range(6)], campaign="spread"))
    await b.submit(job("cb", [f"cb{i}@ok.test" for i in range(4)], campaign="spread"))
    await wait_for(lambda: len(sink.delivered()) == 10, 20)

    def delivered(d: Daemon) -> int:
        c = _app(d).campaigns.campaigns.get(("acme", "spread"))
        return c.get("delivered") if c else 0

    await wait_for(lambda: delivered(a) == 10 and delivered(b) == 10, 10)


async def test_redis_lost_and_back_degrades_then_recovers_without_loss(pair: Pair, sink: Sink,
                                                                       redis_server: RedisServer) -> None:
    a, b = pair
    await a.submit(job("d1", [f"d1-{i}@thr.test" for i in range(40)]))
    await asyncio.sleep(0.5)
    redis_server.stop()
    await wait_for(lambda: not _app(a).link.up and not _app(b).link.up, 10)
    assert _app(a).status()["cluster"]["degraded"] is True
    assert b"mta_cluster_degraded 1.0" in metrics.render()
    during = await b.submit(job("d2", [f"d2-{i}@thr.test" for i in range(20)]))  # still accepting
    assert during["accepted"] == 20
    limits = next(t for t in _app(b).throttles.all() if t.rule.provider == "thr")
    assert limits.max_connections == 1  # its share of 2 connections over 2 nodes
    await asyncio.sleep(1.0)
    redis_server.start()
    await wait_for(lambda: _app(a).link.up and _app(b).link.up, 15)
    assert _app(b).status()["cluster"]["degraded"] is False
    await wait_for(lambda: len(sink.delivered()) == 60, 40)
    assert all(n == 1 for n in sink.delivered().values())  # nothing lost, nothing twice
    await _app(a).accounts.set_status("acme", "paused", "admin")  # shared again after recovery
    await wait_for(lambda: _app(b).accounts.get("acme").status == "paused", 5)


async def test_single_node_needs_no_redis(daemon_factory: Any, sink: Sink) -> None:
    d = await daemon_factory(static={"ok.test": [sink.addr]})
    assert _app(d).link is None and _app(d).status()["cluster"] is None
    await d.account()
    await d.submit(job("solo", ["solo@ok.test"]))
    await wait_for(lambda: sink.delivered()["solo@ok.test"] == 1, 10)


async def test_a_node_with_another_token_key_is_refused(tmp_path: Path, redis_server: RedisServer) -> None:
    extra = f'[cluster]\nredis_url = "{redis_server.url}"\n'
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    first = Daemon(write_config(tmp_path / "one", extra=extra))
    await first.start()
    try:
        other = Daemon(write_config(tmp_path / "two", extra=extra))  # a key of its own
        with pytest.raises(ConfigError, match="token_key_file"):
            await other.start()
    finally:
        await first.stop()
