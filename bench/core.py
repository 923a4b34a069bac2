"""Durable acceptance (recipients/s) and latency (acknowledgement -> 250) of the daemon.

    .venv/bin/python -m bench.core [--jobs 30] [--recipients 10000] [--latency-seconds 10]

Everything runs on loopback (bench/harness.py).

- acceptance: `--jobs` jobs of `--recipients` recipients each (10 destination domains,
  personalised ~5 KB text) pipelined over one submit connection; recipients/s from the
  first byte sent to the last answer, each answer given only once the job is fsync'd.
  Baseline in the same run: raw SQLite inserting the same rows with the same durability
  (WAL, synchronous=FULL, one transaction per job), no validation, no socket.
  A throttle of one message an hour holds delivery back meanwhile.
- latency: single-recipient jobs at a moderate rate (200/s) for `--latency-seconds`; for
  each, the time from the submit answer to the end of DATA at a timing sink (a small
  asyncio SMTP server in the bench process); p50 and p99.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .harness import Daemon, TimingSink, job_line, recipients, submit_all, submit_connection

SINK = ("127.0.0.2", 2526)
DOMAINS = [f"d{i}.bench.test" for i in range(10)]


def sqlite_baseline(jobs: list[list[dict[str, Any]]]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "baseline.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE r (id INTEGER PRIMARY KEY, job INT, idx INT, email TEXT, domain TEXT, vars BLOB, "
                   "rhash TEXT, state INT DEFAULT 0, attempts INT DEFAULT 0, next_at REAL DEFAULT 0)")
        t0 = time.perf_counter()
        for j, rcpts in enumerate(jobs):
            rows = [(j, i, r["email"], r["email"].split("@")[1], json.dumps(r["vars"]), "h" * 32)
                    for i, r in enumerate(rcpts)]
            db.execute("BEGIN")
            db.executemany("INSERT INTO r (job, idx, email, domain, vars, rhash) VALUES (?,?,?,?,?,?)", rows)
            db.execute("COMMIT")
        elapsed = time.perf_counter() - t0
        db.close()
    return sum(map(len, jobs)) / elapsed


def acceptance(daemon: Daemon, jobs: list[list[dict[str, Any]]]) -> tuple[float, float]:
    """(recipients/s, cores the daemon used meanwhile)."""
    lines = [job_line(f"accept-{j}-{os.getpid()}", rcpts) for j, rcpts in enumerate(jobs)]
    cpu = daemon.cpu_seconds()
    elapsed = submit_all(daemon, lines, [len(rcpts) for rcpts in jobs], 300)
    return sum(map(len, jobs)) / elapsed, (daemon.cpu_seconds() - cpu) / elapsed


def latency(daemon: Daemon, sink: TimingSink, seconds: float, rate: float = 200.0) -> tuple[float, float, int]:
    """Single-recipient jobs at `rate`; delay from each submit answer to its 250 at the sink."""
    acked: dict[str, float] = {}
    n = int(seconds * rate)
    with submit_connection(daemon.submit_socket, 30) as (sock, answers):
        t0 = time.time()
        for i in range(n):
            time.sleep(max(0.0, t0 + i / rate - time.time()))
            address = f"lat{i}@{DOMAINS[i % len(DOMAINS)]}"
            sock.sendall(job_line(f"lat-{i}-{os.getpid()}", [{"email": address, "vars": {"name": "L"}}]))
            if json.loads(answers.readline()).get("accepted") != 1:
                raise SystemExit("a latency job was not accepted")
            acked[address] = time.time()
    end = time.monotonic() + 30
    while len(sink.arrived) < n and time.monotonic() < end:
        time.sleep(0.05)
    delays = [sink.arrived[a] - t for a, t in acked.items() if a in sink.arrived]
    if len(delays) < n:
        raise SystemExit(f"only {len(delays)}/{n} latency messages arrived")
    q = statistics.quantiles(delays, n=100)
    return q[49], q[98], n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=30)
    ap.add_argument("--recipients", type=int, default=10000)
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    args = ap.parse_args()
    jobs = [recipients(args.recipients, DOMAINS, prefix=f"j{j}-") for j in range(args.jobs)]
    routes = {d: f"{SINK[0]}:{SINK[1]}" for d in DOMAINS}
    # a throttle of one message an hour holds delivery back: the figure is acceptance alone
    daemon = Daemon(routes, rate="1/h")
    try:
        daemon.start()
        rate, cores = acceptance(daemon, jobs)
    finally:
        daemon.stop()
    base = sqlite_baseline(jobs)
    print(f"machine: {os.cpu_count()} cores; {args.jobs} jobs x {args.recipients:,} recipients, "
          f"~5 KB personalised text, 10 domains")
    print(f"acceptance  mta {rate:,.0f} recipients/s (durable, over the socket) | raw SQLite, same rows, "
          f"WAL+fsync per job: {base:,.0f}/s | ratio {rate / base:.2f} | daemon used {cores:.2f} cores")
    sink = TimingSink(*SINK)
    daemon = Daemon(routes)
    try:
        daemon.start()
        p50, p99, n = latency(daemon, sink, args.latency_seconds)
        print(f"latency     {n} single-recipient jobs at 200/s: acknowledgement -> 250 p50 {p50 * 1000:.1f} ms, "
              f"p99 {p99 * 1000:.1f} ms")
    finally:
        daemon.stop()
        sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
