"""Core throughput: durable acceptance (recipients/s) and delivery (messages/s) to a local sink.

    .venv/bin/python -m bench.core [--recipients 20000] [--jobs 4]

Everything runs on loopback. Each figure comes with a baseline measured in the same run,
on the same machine, and the ratio between them (absolute numbers drift with the machine):

- acceptance: `mta` accepting jobs over the submit socket, against raw SQLite inserting
  the same rows with the same durability (WAL, synchronous=FULL, one transaction per job);
- delivery: `mta` delivering a personalised ~5 KB message per recipient to an aiosmtpd
  sink in another process, against a bare aiosmtplib loop (no spool, no rendering,
  the same 8 connections) sending one fixed message to the same sink.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import secrets
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BODY = "Hi {{name}},\n\n" + ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\n" * 60)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def run_sink(host: str, port: int, counter: multiprocessing.sharedctypes.Synchronized) -> None:  # type: ignore[name-defined]
    from aiosmtpd.controller import Controller

    class Handler:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            with counter.get_lock():
                counter.value += 1
            return "250 OK"

    c = Controller(Handler(), hostname=host, port=port, server_hostname="sink")
    c.start()
    while True:
        time.sleep(3600)


def wait_count(counter: multiprocessing.sharedctypes.Synchronized, target: int, limit: float) -> float:  # type: ignore[name-defined]
    t0 = time.monotonic()
    while counter.value < target and time.monotonic() - t0 < limit:
        time.sleep(0.01)
    return time.monotonic() - t0


def job(j: int, n: int, domains: int) -> dict[str, object]:
    return {"op": "submit", "job_id": f"bench-{j}", "account": "bench", "campaign": "bench",
            "sending_domain": "mlgnserv.com", "from": "Bench <b@bench.example>", "subject": "Hello {{name}}",
            "text": BODY, "recipients": [{"email": f"r{j}-{i}@d{i % domains}.bench.test",
                                          "vars": {"name": f"N{i}"}} for i in range(n)]}


def sqlite_baseline(tmp: Path, jobs: list[dict[str, object]]) -> float:
    db = sqlite3.connect(tmp / "baseline.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE r (id INTEGER PRIMARY KEY, job INT, idx INT, email TEXT, domain TEXT, vars BLOB, "
               "rhash TEXT, state INT DEFAULT 0, attempts INT DEFAULT 0, next_at REAL DEFAULT 0)")
    t0 = time.perf_counter()
    for j, body in enumerate(jobs):
        rows = [(j, i, r["email"], r["email"].split("@")[1], json.dumps(r["vars"]), "h" * 32)  # type: ignore[index]
                for i, r in enumerate(body["recipients"])]  # type: ignore[arg-type]
        db.execute("BEGIN")
        db.executemany("INSERT INTO r (job, idx, email, domain, vars, rhash) VALUES (?,?,?,?,?,?)", rows)
        db.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    db.close()
    return sum(len(b["recipients"]) for b in jobs) / elapsed  # type: ignore[arg-type]


async def aiosmtplib_baseline(host: str, port: int, n: int, conns: int) -> float:
    import aiosmtplib

    data = ("From: b@bench.example\r\nTo: x@d.test\r\nSubject: x\r\n\r\n" + BODY.replace("\n", "\r\n")).encode()
    per = n // conns

    async def one() -> None:
        smtp = aiosmtplib.SMTP(hostname=host, port=port, local_hostname="bench", start_tls=False)
        await smtp.connect()
        for i in range(per):
            await smtp.sendmail("b@bench.example", [f"x{i}@d.test"], data)
        await smtp.quit()

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(conns)))
    return per * conns / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipients", type=int, default=20000)
    ap.add_argument("--jobs", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mta-bench-"))
    host = "127.0.0.9"
    port = free_port(host)
    counter = multiprocessing.Value("q", 0)
    sink = multiprocessing.Process(target=run_sink, args=(host, port, counter), daemon=True)
    sink.start()
    time.sleep(1.0)
    per_job = args.recipients // args.jobs
    jobs = [job(j, per_job, 10) for j in range(args.jobs)]
    total = per_job * args.jobs

    (tmp / "token.key").write_text(secrets.token_hex(32))
    static = "\n".join(f'"d{i}.bench.test" = ["{host}:{port}"]' for i in range(10))
    (tmp / "mta.toml").write_text(f"""
[daemon]
state_dir = "{tmp}/state"
submit_socket = "{tmp}/submit.sock"
control_socket = "{tmp}/control.sock"
[metrics]
listen = "127.0.0.1:{free_port()}"
[dns]
nameservers = ["127.0.0.1:{free_port()}"]
[dns.static]
{static}
[security]
token_key_file = "{tmp}/token.key"
[sending_domains."mlgnserv.com"]
ehlo = "mta1.mlgnserv.com"
[[shaping]]
max_connections = 8
max_messages_per_connection = 100000
max_rate = "1000000/s"
""")
    daemon = subprocess.Popen([sys.executable, "-m", "mta", "run", "--config", str(tmp / "mta.toml")],
                              stdout=open(tmp / "daemon.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        while not os.path.exists(tmp / "submit.sock"):
            time.sleep(0.05)
        from mta.cli import request

        request(str(tmp / "control.sock"), {"op": "accounts.set", "id": "bench", "plan": "monthly",
                                             "subscribers": 10**7, "notify": "o@b.test", "status": "active"})
        lines = b"".join(json.dumps(j).encode() + b"\n" for j in jobs)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(tmp / "submit.sock"))
            f = s.makefile("rb")
            t0 = time.perf_counter()
            s.sendall(lines)
            answers = [json.loads(f.readline()) for _ in jobs]
            accept_s = time.perf_counter() - t0
        assert all(a.get("accepted") == per_job for a in answers), answers[0]
        # delivery starts as soon as the first job is durable: end to end is submit -> last 250
        end_to_end_s = accept_s + wait_count(counter, total, 600)
        delivered = counter.value
        base_accept = sqlite_baseline(tmp, jobs)
        counter.value = 0
        base_send = asyncio.run(aiosmtplib_baseline(host, port, min(total, 10000), 8))
    finally:
        daemon.terminate()
        daemon.wait(30)
        sink.terminate()
    accept_rate = total / accept_s
    end_to_end = delivered / end_to_end_s
    print(f"machine: {os.cpu_count()} cores; {args.jobs} jobs x {per_job} recipients, ~5 KB personalised text")
    print(f"acceptance  mta {accept_rate:,.0f} recipients/s | raw SQLite same rows+fsync {base_accept:,.0f}/s "
          f"| ratio {accept_rate / base_accept:.2f}")
    print(f"delivery    mta {end_to_end:,.0f} msg/s end to end ({delivered}/{total}) | bare aiosmtplib "
          f"{base_send:,.0f}/s | ratio {end_to_end / base_send:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
