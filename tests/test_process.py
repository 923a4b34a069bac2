"""`mta run` as a real process: kill -9 under load loses nothing; the CLI talks to it."""

from __future__ import annotations

import json
import random
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mta.config import load_config

from .conftest import DaemonProcess, job, mta_cli, write_config
from .mails import dsn
from .sinks import Sink

pytestmark = pytest.mark.slow


def submit_lines(path: str, jobs: list[dict[str, object]]) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(60)
        s.connect(path)
        s.sendall(b"".join(json.dumps(j).encode() + b"\n" for j in jobs))
        f = s.makefile("rb")
        return [json.loads(f.readline()) for _ in jobs]


def test_kill9_mid_delivery_loses_nothing(tmp_path: Path) -> None:
    sink = Sink("127.0.0.6", stall=0.0).start()
    cfg = write_config(tmp_path, static={f"k{i}.test": [sink.addr] for i in range(4)})
    daemon = DaemonProcess(cfg)
    try:
        daemon.start()
        out = mta_cli("accounts", "set", "bulk", "--plan", "monthly", "--subscribers", "100000", "--notify",
                      "o@b.test", "--status", "active", "--config", str(cfg), "--json")
        assert out.returncode == 0, out.stderr
        rcpts = [f"ok{i}@k{i % 4}.test" for i in range(3000)]
        sock = str(tmp_path / "submit.sock")
        answers = submit_lines(sock, [job(f"crash-{j}", rcpts[j * 1000:(j + 1) * 1000], account="bulk")
                                      for j in range(3)])
        assert all(a["accepted"] == 1000 for a in answers)
        end = time.monotonic() + 30
        while len(sink.delivered()) < 150 and time.monotonic() < end:
            time.sleep(0.005)
        daemon.kill9()
        at_kill = sum(sink.delivered().values())
        daemon.start()
        end = time.monotonic() + 90
        while len(sink.delivered()) < len(rcpts) and time.monotonic() < end:
            time.sleep(0.2)
        time.sleep(1.0)
        counts = sink.delivered()
        lost = [r for r in rcpts if not counts[r]]
        dup = sum(n - 1 for n in counts.values() if n > 1)
        assert not lost, f"lost {len(lost)} after kill -9 at {at_kill} delivered"
        assert dup <= 300, f"{dup} duplicates"  # bounded by what was in flight at the kill
    finally:
        daemon.stop()
        sink.stop()


def _events(sock: str) -> list[dict[str, object]]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(sock)
        s.sendall(b'{"op": "events", "after": 0, "limit": 1000000}\n')
        answer = json.loads(s.makefile("rb").readline())
    return answer["events"]  # type: ignore[no-any-return]


def _send_dsn(listen: tuple[str, int], verp: str, rcpt: str) -> bool:
    """A DSN for one delivered message to its VERP address; True when the listener said 250."""
    try:
        with smtplib.SMTP(*listen, timeout=5) as client:
            client.sendmail("", [verp], dsn(verp, rcpt, "5.2.2", "552 5.2.2 Mailbox full"))
        return True
    except (OSError, smtplib.SMTPException):
        return False


def test_many_kills_under_mixed_load_lose_nothing(tmp_path: Path) -> None:
    """Six kill -9 at seeded random moments while jobs are accepted, mail is delivered,
    deferred and refused, and DSNs come in: after each restart the spool opens; at the end
    every acknowledged recipient is delivered or bounced, every DSN the listener took is
    recorded once, and the duplicates are bounded by what was in flight."""
    rng = random.Random(8)
    sink = Sink("127.0.0.6", stall=0.0).start()
    cfg = write_config(tmp_path, static={f"m{i}.test": [sink.addr] for i in range(3)}, retry=["1s", "1s", "2s"])
    listen = load_config(cfg).listener_listen
    sock = str(tmp_path / "submit.sock")
    daemon = DaemonProcess(cfg)
    acknowledged: list[str] = []
    dsns: dict[str, str] = {}  # VERP address -> recipient, for DSNs the listener took
    try:
        for round_ in range(7):
            daemon.start()
            if round_ == 0:
                out = mta_cli("accounts", "set", "bulk", "--plan", "monthly", "--subscribers", "100000",
                              "--notify", "o@b.test", "--status", "active", "--config", str(cfg), "--json")
                assert out.returncode == 0, out.stderr
            if round_ == 6:
                break  # the last start: no more kills
            # 2 % hard: under the account's pause threshold (SPEC §1), which would refuse the next job
            kinds = ["hard" if i % 50 == 0 else "defer" if i % 10 == 5 else "ok" for i in range(300)]
            rcpts = [f"{kinds[i]}{round_}x{i}@m{i % 3}.test" for i in range(300)]
            answers = submit_lines(sock, [job(f"r{round_}", rcpts, account="bulk")])
            assert answers[0].get("accepted") == 300, answers[0]
            acknowledged += rcpts
            for got in rng.sample(sink.messages(), min(5, len(sink.messages()))):
                if got.mail_from not in dsns and _send_dsn(listen, got.mail_from, got.rcpt):
                    dsns[got.mail_from] = got.rcpt
            time.sleep(rng.uniform(0.05, 0.8))
            daemon.kill9()
        good = [r for r in acknowledged if not r.startswith("hard")]
        end = time.monotonic() + 90
        while not all(sink.delivered()[r] for r in good) and time.monotonic() < end:
            time.sleep(0.2)
        hard = {r for r in acknowledged if r.startswith("hard")}
        end = time.monotonic() + 30
        while time.monotonic() < end:
            events = _events(sock)
            bounced = [e for e in events if e["type"] == "bounced"]
            if hard <= {e["recipient"] for e in bounced if not e.get("async")} and \
                    len([e for e in bounced if e.get("async")]) >= len(dsns):
                break
            time.sleep(0.3)
        counts = sink.delivered()
        lost = [r for r in good if not counts[r]]
        assert not lost, f"lost {len(lost)} of {len(good)} after {daemon.starts - 1} kills"
        assert not any(counts[r] for r in hard)
        sync = {e["recipient"] for e in bounced if not e.get("async")}
        assert hard <= sync, f"{len(hard - sync)} hard-refused recipients without a bounced event"
        async_bounces = sorted(str(e["recipient"]) for e in bounced if e.get("async"))
        assert async_bounces == sorted(dsns.values())  # each DSN taken is recorded, once
        dup = sum(n - 1 for n in counts.values() if n > 1)
        assert dup <= 6 * 300, f"{dup} duplicates"  # at most what was in flight at each kill
        assert len(dsns) >= 5 and daemon.starts == 7
        print(f"kills 6, acknowledged {len(acknowledged)}, lost 0, duplicates {dup}, "
              f"DSNs taken {len(dsns)}, hard bounces {len(hard)}")
    finally:
        daemon.stop()
        sink.stop()


def test_cli_admin_commands(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    daemon = DaemonProcess(cfg)
    try:
        daemon.start()
        base = ["--config", str(cfg)]

        def cli(*args: str) -> object:
            out = mta_cli(*args, *base, "--json")
            assert out.returncode == 0, out.stdout + out.stderr
            return json.loads(out.stdout)

        shown = cli("accounts", "set", "acme", "--plan", "trial", "--subscribers", "50", "--notify", "o@a.test")
        assert shown["status"] == "review" and shown["hard_bounce_threshold"] == 0.08  # type: ignore[index]
        assert cli("accounts", "approve", "acme")["status"] == "active"  # type: ignore[index]
        assert cli("accounts", "pause", "acme")["status"] == "paused"  # type: ignore[index]
        resumed = cli("accounts", "resume", "acme")
        assert resumed["status"] == "active" and resumed["monthly_cap"] == 109 * 50  # type: ignore[index]
        assert [a["id"] for a in cli("accounts", "list")] == ["acme"]  # type: ignore[union-attr]
        assert cli("status")["queue"]["held"] == 0  # type: ignore[index]
        assert [q["account"] for q in cli("queue", "--by", "account")] in ([], ["_mta"])  # type: ignore[union-attr]
        events = [e for e in cli("events") if e["account"] == "acme"]  # type: ignore[union-attr,index]
        # approve (review -> active), pause, resume: each status change is an event
        assert [e["type"] for e in events] == ["resumed", "paused", "resumed"]
        # errors: one JSON value, non-zero exit
        out = mta_cli("accounts", "show", "nobody", *base, "--json")
        assert out.returncode != 0 and json.loads(out.stdout)["error"]["code"] == "unknown_account"
        out = mta_cli("accounts", "set", "x", "--plan", "monthly", "--subscribers", "1", "--notify", "o@x.test",
                      "--hard-bounce-threshold", "0.5", *base, "--json")
        assert out.returncode != 0 and "0.08..0.15" in json.loads(out.stdout)["error"]["message"]
        # suppression: an account's list and the global one; submissions honour both
        assert cli("suppress", "add", "Gone@Nowhere.test", "--account", "acme")["added"] is True  # type: ignore[index]
        added = cli("suppress", "add", "spamtrap@nowhere.test")
        listed = cli("suppress", "list", "--account", "acme")
        assert [e["address"] for e in listed] == ["gone@nowhere.test"]  # type: ignore[index,union-attr]
        # (the global list also has the pause notice's address: o@a.test does not resolve, a hard bounce)
        admin_entries = [e["hash"] for e in cli("suppress", "list") if e["reason"] == "admin"]  # type: ignore[index,union-attr]
        assert admin_entries == [added["hash"]]
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps(job("cli-1", ["ok@nowhere.test", "gone@nowhere.test", "spamtrap@nowhere.test"])))
        out = mta_cli("submit", str(job_file), *base, "--json")
        answer = json.loads(out.stdout)
        assert answer["accepted"] == 1 and [r["code"] for r in answer["rejected"]] == ["suppressed", "suppressed"]
        assert cli("suppress", "remove", added["hash"])["removed"] is True  # type: ignore[index]
        assert [e for e in cli("suppress", "list") if e["reason"] == "admin"] == []  # type: ignore[index,union-attr]
        # manual review of a trial account's mail
        cli("accounts", "set", "tri", "--plan", "trial", "--subscribers", "5", "--notify", "o@t.test",
            "--status", "active")
        job_file.write_text(json.dumps(job("tri-1", ["a@nowhere.test", "b@nowhere.test"], account="tri")))
        assert json.loads(mta_cli("submit", str(job_file), *base, "--json").stdout)["held_for_review"] is True
        items = cli("review", "list", "--account", "tri")
        assert [i["recipient"] for i in items] == ["a@nowhere.test", "b@nowhere.test"]  # type: ignore[index,union-attr]
        assert cli("review", "reject", items[0]["id"])["rejected"] == 1  # type: ignore[index]
        assert cli("review", "approve", "--account", "tri", "--all")["approved"] == 1  # type: ignore[index]
        assert [i["account"] for i in cli("review", "list")] == ["acme"]  # type: ignore[index,union-attr]
        out = mta_cli("review", "approve", *base, "--json")
        assert out.returncode != 0 and json.loads(out.stdout)["error"]["code"] == "invalid_argument"
    finally:
        assert daemon.stop() == 0  # SIGTERM: a clean exit


def test_run_refuses_a_bad_config_naming_the_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, retry=["soon"])
    out = mta_cli("run", "--config", str(cfg))
    assert out.returncode != 0 and b"queue.retry_schedule[0]" in out.stdout


def test_delete_killed_mid_way_is_finished_by_running_it_again(tmp_path: Path) -> None:
    """kill -9 while `mta accounts delete` runs: the spool has all of it or none of it; after a
    restart the account is either gone or deleted by the second run, and its waiting mail is
    never delivered."""
    sink = Sink("127.0.0.7", defer_times=1000).start()
    cfg = write_config(tmp_path, static={"d.test": [sink.addr]}, retry=["1s"])
    daemon = DaemonProcess(cfg)
    base = ["--config", str(cfg), "--json"]
    try:
        daemon.start()
        assert mta_cli("accounts", "set", "gone", "--plan", "monthly", "--subscribers", "100000", "--notify",
                       "o@b.test", "--status", "active", *base).returncode == 0
        rcpts = [f"defer{i}@d.test" for i in range(2000)]
        [answer] = submit_lines(str(tmp_path / "submit.sock"), [job("big", rcpts, account="gone")])
        assert answer["accepted"] == 2000
        end = time.monotonic() + 20
        while not sink.state.tries and time.monotonic() < end:
            time.sleep(0.01)
        deleting = subprocess.Popen([sys.executable, "-m", "mta", "accounts", "delete", "gone", *base],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.3)
        daemon.kill9()
        deleting.communicate(timeout=30)
        daemon.start()
        again = mta_cli("accounts", "delete", "gone", *base)
        code = json.loads(again.stdout)["error"]["code"] if again.returncode else "deleted now"
        assert code in ("unknown_account", "deleted now")
        shown = mta_cli("accounts", "show", "gone", *base)
        assert json.loads(shown.stdout)["error"]["code"] == "unknown_account"
        delivered_before = sum(sink.delivered().values())
        time.sleep(2.5)  # retries would be due twice over
        assert sum(sink.delivered().values()) == delivered_before == 0
        spool = (tmp_path / "state" / "spool.db").read_bytes() + (tmp_path / "state" / "spool.db-wal").read_bytes()
        assert b"defer1999@d.test" not in spool
    finally:
        daemon.stop()
        sink.stop()
