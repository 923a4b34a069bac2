"""One job with a million recipients: the daemon's memory while and after accepting it.

    .venv/bin/python -m bench.bigjob [--recipients 1000000]

A daemon with `submit.max_recipients_per_job` and `max_line_bytes` raised for the job is
given one job line (recipients `{"email": "userN@dN.bigjob.test", "vars": {"name": "uN"}}`,
~60 MB for a million) while a throttle of one message an hour holds delivery back. Printed:
seconds to the acknowledgement, resident memory before, the peak while accepting (VmHWM)
and the resident memory after (VmRSS), as a ratio to the memory before: what the job
itself costs the daemon.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .harness import Daemon, job_line, recipients, submit_all

DOMAINS = [f"d{i}.bigjob.test" for i in range(10)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipients", type=int, default=1_000_000)
    args = ap.parse_args()
    n = args.recipients
    extra = f"[submit]\nmax_recipients_per_job = {n}\nmax_line_bytes = {max(67108864, n * 96)}\n"
    # nothing listens at the route: the throttle holds the queue anyway
    daemon = Daemon(dict.fromkeys(DOMAINS, "127.0.0.9:9"), rate="1/h", extra=extra)
    try:
        daemon.start()
        time.sleep(1)
        before = daemon.memory_mb("VmRSS")
        line = job_line(f"big-{os.getpid()}", recipients(n, DOMAINS))
        took = submit_all(daemon, [line], [n], timeout=1200)
        del line
        time.sleep(2)  # let the allocator settle
        peak, after = daemon.memory_mb("VmHWM"), daemon.memory_mb("VmRSS")
    finally:
        daemon.stop()
    print(f"one job of {n:,} recipients: acknowledged in {took:.1f} s ({n / took:,.0f} rcpt/s)")
    print(f"resident memory: before {before:.0f} MB, peak {peak:.0f} MB, after {after:.0f} MB")
    print(f"the job's cost: peak +{peak - before:.0f} MB, steady +{after - before:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
