"""End to end against Postfix: the same work, the same `smtp-sink`, the same run.

    .venv/bin/python -m bench.postfix [--messages 10000] [--rounds 1] [--mta-only]
                                      [--no-dkim | --dkim-only] [--profile DIR]

Needs root for Postfix (it is started and stopped with `postfix start|stop`) and Debian's
`postfix` package, which also brings `smtp-sink` and `smtp-source`; the command installs
it with apt-get when it is missing and writes a minimal main.cf when there is none (a
"No configuration" install leaves none).

- Postfix: a relay from 127.0.0.1:25 to the sink with 20 connections and the connection
  cache on, TLS off; `smtp-source -s 20` injects N single-recipient ~5 KB messages. Time:
  first injection -> the sink has all N.
- mta: one job of N recipients over 10 destination domains, subject and ~5 KB body
  personalised, 20 connections, durability and throttles on, submitted over the socket.
  Time: first byte submitted -> the sink has all N. Once without DKIM, once with an
  RSA-2048 key.

Printed: messages/s of each and the ratios mta/postfix, median over the rounds.
Also printed: the cores each process used during the mta runs (daemon, DKIM key worker,
smtp-sink), which shows what limits the run. `--profile DIR` writes py-spy's collapsed
stacks of each mta run (pip install py-spy).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .harness import Daemon, SmtpSink, cpu_seconds, job_line, profiled, recipients, submit_connection

SINK = ("127.0.0.2", 2525)
DOMAINS = [f"d{i}.perf.test" for i in range(10)]
POSTFIX = [
    "inet_interfaces=127.0.0.1", "inet_protocols=ipv4", "mydestination=", "local_recipient_maps=",
    "mynetworks=127.0.0.0/8", "smtpd_relay_restrictions=permit_mynetworks,reject",
    f"relayhost=[{SINK[0]}]:{SINK[1]}", "default_destination_concurrency_limit=20",
    "smtp_connection_cache_on_demand=yes", "smtpd_tls_security_level=none", "smtp_tls_security_level=none",
    "maillog_file=/var/log/postfix-bench.log",
]


def run(argv: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)


def postfix_setup() -> None:
    if not all(shutil.which(x) for x in ("postfix", "smtp-sink", "smtp-source", "postconf")):
        run(["sh", "-c", "echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections"])
        subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], check=True, capture_output=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=600)
    main_cf = Path("/etc/postfix/main.cf")
    if not main_cf.exists():
        shutil.copy("/usr/share/postfix/main.cf.debian", main_cf)
    postfix_stop()
    run(["postconf", "-e", *POSTFIX])
    if "." not in run(["postconf", "-h", "myhostname"]).stdout:
        run(["postconf", "-e", "myhostname=mta.bench.local"])
    run(["/usr/lib/postfix/configure-instance.sh", "-"], check=False)


def postfix_stop() -> None:
    if subprocess.run(["postfix", "status"], capture_output=True).returncode == 0:
        run(["postfix", "stop"], check=False)


def bench_postfix(workdir: Path, n: int) -> float:
    sink = SmtpSink(workdir, *SINK, tag="postfix-sink")
    try:
        run(["postsuper", "-d", "ALL"], check=False)
        run(["postfix", "start"])
        t0 = time.monotonic()
        source = subprocess.Popen(["smtp-source", "-s", "20", "-d", "-m", str(n), "-l", "5000", "-M", "bench.local",
                                   "-f", "sender@bench.local", "-t", "rcpt@example.com", "127.0.0.1:25"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        done = sink.wait(n, 300)
        source.wait(30)
        if done is None:
            raise SystemExit(f"postfix delivered {sink.count()}/{n} in 300 s")
        return n / (done - t0)
    finally:
        postfix_stop()
        sink.stop()


def bench_mta(workdir: Path, n: int, dkim: bool, profile: Path | None) -> float:
    sink = SmtpSink(workdir, *SINK, tag=f"mta-sink-{dkim}")
    daemon = Daemon({d: f"{SINK[0]}:{SINK[1]}" for d in DOMAINS}, connections=20, dkim=dkim)
    try:
        daemon.start()
        line = job_line(f"perf-{dkim}-{os.getpid()}", recipients(n, DOMAINS))
        assert daemon.proc is not None
        with profiled(daemon.proc.pid, profile), submit_connection(daemon.submit_socket, 300) as (sock, answers):
            answer: list[bytes] = []
            reader = threading.Thread(target=lambda: answer.append(answers.readline()), daemon=True)
            reader.start()
            t0, cpu0, sink_cpu0 = time.monotonic(), daemon.cpu_seconds(), cpu_seconds(sink.proc.pid)
            child0 = daemon.children_cpu_seconds()
            sock.sendall(line)
            done = sink.wait(n, 300)
            if done is not None:
                took = done - t0
                print(f"  mta{' dkim' if dkim else ''}: cores used: daemon {(daemon.cpu_seconds() - cpu0) / took:.2f}, "
                      f"key worker {(daemon.children_cpu_seconds() - child0) / took:.2f}, "
                      f"smtp-sink {(cpu_seconds(sink.proc.pid) - sink_cpu0) / took:.2f}", flush=True)
            reader.join(10)
        if done is None:
            raise SystemExit(f"mta delivered {sink.count()}/{n} in 300 s: {answer}")
        if b'"accepted":' + str(n).encode() not in b"".join(answer):
            raise SystemExit(f"job not accepted whole: {answer}")
        return n / (done - t0)
    finally:
        daemon.stop()
        sink.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--mta-only", action="store_true", help="skip Postfix (no ratios)")
    ap.add_argument("--no-dkim", action="store_true", help="skip the DKIM run")
    ap.add_argument("--dkim-only", action="store_true", help="skip the run without DKIM")
    ap.add_argument("--profile", type=Path, help="directory for py-spy flame graphs of the mta runs")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mta-vs-postfix-"))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if not args.mta_only:
        postfix_setup()
    rates: dict[str, list[float]] = {"postfix": [], "mta": [], "mta_dkim": []}
    try:
        for k in range(args.rounds):
            if not args.mta_only:
                rates["postfix"].append(bench_postfix(workdir, args.messages))
            for tag, dkim in (("mta", False), ("mta_dkim", True)):
                if (dkim and args.no_dkim) or (not dkim and args.dkim_only):
                    continue
                out = args.profile / f"{tag}-{k}.txt" if args.profile else None
                rates[tag].append(bench_mta(workdir, args.messages, dkim, out))
            print(f"round {k + 1}: " + ", ".join(f"{t} {r[-1]:,.0f} msg/s" for t, r in rates.items() if r),
                  flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    med = {t: statistics.median(r) for t, r in rates.items() if r}
    print(f"machine: {os.cpu_count()} cores; {args.messages} messages of ~5 KB, 20 connections, smtp-sink")
    line = ", ".join(f"{t}={v:,.0f} msg/s" for t, v in med.items())
    if "postfix" in med:
        ratios = " ".join(f"{t}/postfix={v / med['postfix']:.2f}" for t, v in med.items() if t != "postfix")
        line = f"{ratios} ({line})"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
