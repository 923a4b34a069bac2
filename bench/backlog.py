"""A million recipients queued: the daemon's memory, and whether delivery slows down.

    .venv/bin/python -m bench.backlog [--queued 1000000] [--measure 20000] [--rounds 3]

Twice per round, in the same run, with Postfix's smtp-sink as the receiver (jobs of 10,000
recipients, ~5 KB personalised, 10 domains, 20 connections): a daemon is given recipients
while a throttle of one message an hour holds delivery back; then the throttle is lifted
(new config, SIGHUP) and the first `--measure` deliveries are timed.

- baseline: only the `--measure` recipients are queued;
- backlog: `--queued` recipients are queued. Printed: resident memory once all are
  spooled (VmRSS), the peak while accepting them (VmHWM), and the delivery rate's ratio
  to the baseline's.

Delivery rates over a few seconds swing by ±10 % on this machine from run to run, as
much as the margin measured; each round runs both, and the medians over the rounds are
printed (and each round's ratio).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .harness import Daemon, SmtpSink, job_line, recipients, submit_all

SINK = ("127.0.0.2", 2527)
DOMAINS = [f"d{i}.backlog.test" for i in range(10)]
PER_JOB = 10_000


def run(sink: SmtpSink, routes: dict[str, str], queued: int, measure: int) -> dict[str, float]:
    """`queued` recipients spooled behind a closed throttle, then the rate of the first
    `measure` deliveries once it opens (SIGHUP with a new config)."""
    daemon = Daemon(routes, rate="1/h")
    start = sink.count()  # the throttle still lets a first message through: it counts as measured
    try:
        daemon.start()
        n_jobs, tag = queued // PER_JOB, f"q{queued}"
        lines = (job_line(f"{tag}-{j}-{os.getpid()}", recipients(PER_JOB, DOMAINS, prefix=f"{tag}{j}-"))
                 for j in range(n_jobs))
        took = submit_all(daemon, lines, [PER_JOB] * n_jobs)
        time.sleep(2)  # let the allocator settle after the last job
        out = {"took": took, "rss": daemon.memory_mb("VmRSS"), "peak": daemon.memory_mb("VmHWM")}
        daemon.config.write_text(daemon.config.read_text().replace('max_rate = "1/h"', 'max_rate = "6000000/min"'))
        assert daemon.proc is not None
        t0 = time.monotonic()
        os.kill(daemon.proc.pid, signal.SIGHUP)
        done = sink.wait(start + measure, 600)
        if done is None:
            raise SystemExit(f"{sink.count() - start}/{measure} delivered in 600 s")
        out["rate"] = measure / (done - t0)
        return out
    finally:
        daemon.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queued", type=int, default=1_000_000)
    ap.add_argument("--measure", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mta-backlog-"))
    routes = {d: f"{SINK[0]}:{SINK[1]}" for d in DOMAINS}
    sink = SmtpSink(workdir, *SINK)
    empties, fulls = [], []
    try:
        for k in range(args.rounds):
            empties.append(run(sink, routes, args.measure, args.measure))
            fulls.append(run(sink, routes, args.queued, args.measure))
            print(f"round {k + 1}: {fulls[-1]['rate']:,.0f} msg/s with {args.queued:,} queued, "
                  f"{empties[-1]['rate']:,.0f} with {args.measure:,}: ratio "
                  f"{fulls[-1]['rate'] / empties[-1]['rate']:.2f}; {fulls[-1]['rss']:,.0f} MB resident", flush=True)
    finally:
        sink.stop()

    def median(runs: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    took, rate, base = median(fulls, "took"), median(fulls, "rate"), median(empties, "rate")
    print(f"machine: {os.cpu_count()} cores; jobs of {PER_JOB:,} recipients, ~5 KB personalised, 10 domains; "
          f"medians of {args.rounds} rounds")
    print(f"accepted  {args.queued:,} recipients in {took:.1f} s ({args.queued / took:,.0f}/s)")
    print(f"memory    {median(fulls, 'rss'):,.0f} MB resident with {args.queued:,} queued (highest "
          f"{max(r['rss'] for r in fulls):,.0f}; peak while accepting {max(r['peak'] for r in fulls):,.0f} MB); "
          f"{median(empties, 'rss'):,.0f} MB with {args.measure:,}")
    print(f"delivery  {rate:,.0f} msg/s with {args.queued:,} queued | {base:,.0f} msg/s with only "
          f"the {args.measure:,} measured ones queued, same run | ratio {rate / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
