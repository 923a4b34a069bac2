"""Scheduler cost per delivery as the number of destination domains grows (issue 4).

    .venv/bin/python -m bench.scheduler [--messages 20000]

The real spool, scheduler, ready queues, throttles and results.record run. Only the
network is replaced: the dispatcher's sessions answer 250 at once, and DNS is a dict.
Messages are spread over 10, 100, 1,000 and 10,000 destination domains (each its own MX
site, hence its own ready queue), at least 20 per domain: a site's fixed costs (one route,
one spool read, one connection) are paid once per site and are not what this measures.
The figure is CPU microseconds per delivery, and its ratio to the 10-domain run in the
same process.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import msgspec

from mta.config import parse_config
from mta.policy.accounts import AccountBook
from mta.policy.counters import CampaignBook
from mta.policy.enforce import PolicyEnforcer
from mta.queue.ready import ReadyQueues
from mta.queue.scheduler import Scheduler
from mta.queue.spool import Spool, insert_job
from mta.results import Results
from mta.throttle.limits import Throttles
from mta.throttle.shaping import RuleBook
from mta.types import Content, JobInfo, MxHost, RecipientRow, Reply, Route

OK = Reply(250, "2.0.0 ok", "data")


class InstantSession:
    usable = True

    async def deliver(self, row: RecipientRow) -> Reply:
        return OK

    async def close(self) -> None:
        return None


class InstantDispatcher:
    async def connect(self, route: Route, sending_domain: str) -> InstantSession:
        return InstantSession()


class DictResolver:
    async def resolve(self, domain: str) -> Route:
        return Route(domain, (MxHost(f"mx.{domain}", (("127.0.0.1", 25),)),))


async def run(domains: int, messages: int, policy: bool = True) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="mta-sched-"))
    config = parse_config({"daemon": {"state_dir": str(tmp)}, "sending_domains": {"mlgnserv.com": {}},
                           "shaping": [{"max_connections": 20, "max_messages_per_connection": 1000}]})
    spool = Spool(tmp)
    spool.open(asyncio.get_running_loop())
    results = Results(spool, config, lambda a: a)
    accounts = AccountBook(spool)
    if policy:  # the account policy's counters and judging, as the daemon wires them
        await accounts.set("bench", {"plan": "monthly", "subscribers": 10**6, "notify": "o@b.test",
                                     "status": "active", "created": "2020-01-01"})
        campaigns = CampaignBook(spool)
        enforcer = PolicyEnforcer(config.policy, accounts, campaigns, spool)
        results.listeners.append(enforcer.on_outcome)
        results.write_hooks.append(campaigns.take_writes)
    scheduler = Scheduler(spool, results.record, lambda account: False)
    ready = ReadyQueues(DictResolver(), RuleBook(config.shaping, builtin=()), Throttles(), InstantDispatcher(),
                        scheduler)
    scheduler.router = ready
    values = msgspec.Raw(b'{"name":"x"}')
    rows = [(i, f"r{i}@d{i % domains}.test", f"d{i % domains}.test", values, "h") for i in range(messages)]
    event = (time.time(), "accepted", "bench", b"{}")
    _, job_row, first, _, _ = await spool.transact(insert_job, "bench", "j", "c", "mlgnserv.com", b"d",
                                                   msgspec.json.encode(Content(text="x")), b"{}", time.time(),
                                                   rows, event)
    info = JobInfo(job_row, "bench", "j", "c", "mlgnserv.com", time.time())
    t0 = time.process_time()
    scheduler.add(info, ((first + i, r[2]) for i, r in enumerate(rows)))
    while results.counts["delivered"] < messages:
        await asyncio.sleep(0.001)
    cpu = time.process_time() - t0
    spool.close()
    return cpu / messages * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    args = ap.parse_args()
    import logging

    logging.disable(logging.CRITICAL)
    from mta.logs import setup

    setup(logging.CRITICAL)
    # the account policy's share: alternating runs without and with it, medians of five each
    pairs = [(asyncio.run(run(10, args.messages, policy=False)), asyncio.run(run(10, args.messages)))
             for _ in range(5)]
    without = statistics.median(p[0] for p in pairs)
    with_policy = statistics.median(p[1] for p in pairs)
    print(f"    10 destination domains: {without:7.1f} us CPU per delivery without the account policy, "
          f"{with_policy:.1f} with it (ratio {with_policy / without:.2f}, medians of 5)")
    base = None
    for domains in (10, 100, 1000, 10000):
        us = asyncio.run(run(domains, max(args.messages, 20 * domains)))
        base = base or us
        print(f"{domains:6d} destination domains: {us:7.1f} us CPU per delivery  (ratio to 10 domains {us / base:.2f})")


if __name__ == "__main__":
    main()
