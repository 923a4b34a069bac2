"""A million recipients queued: the daemon's memory, and whether delivery slows down.

    .venv/bin/python -m bench.backlog [--queued 1000000] [--measure 20000]

Twice, in the same run, with Postfix's smtp-sink as the receiver (jobs of 10,000
recipients, ~5 KB personalised, 10 domains, 20 connections): a daemon is given recipients
while a throttle of one message an hour holds delivery back; then the throttle is lifted
(new config, SIGHUP) and the first `--measure` deliveries are timed.

- baseline: only the `--measure` recipients are queued;
- backlog: `--queued` recipients are queued. Printed: resident memory once all are
  spooled (VmRSS), the peak while accepting them (VmHWM), and the delivery rate's ratio
  to the baseline's.
"""

from __future__ import annotations

import argparse
import os
import signal
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
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mta-backlog-"))
    routes = {d: f"{SINK[0]}:{SINK[1]}" for d in DOMAINS}
    sink = SmtpSink(workdir, *SINK)
    try:
        empty = run(sink, routes, args.measure, args.measure)
        full = run(sink, routes, args.queued, args.measure)
    finally:
        sink.stop()
    print(f"machine: {os.cpu_count()} cores; jobs of {PER_JOB:,} recipients, ~5 KB personalised, 10 domains")
    print(f"accepted  {args.queued:,} recipients in {full['took']:.1f} s ({args.queued / full['took']:,.0f}/s)")
    print(f"memory    {full['rss']:,.0f} MB resident with {args.queued:,} queued (peak while accepting "
          f"{full['peak']:,.0f} MB); {empty['rss']:,.0f} MB with {args.measure:,}")
    print(f"delivery  {full['rate']:,.0f} msg/s with {args.queued:,} queued | {empty['rate']:,.0f} msg/s with only "
          f"the {args.measure:,} measured ones queued, same run | ratio {full['rate'] / empty['rate']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
