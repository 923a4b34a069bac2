"""`mta demo`: a self-contained tour on this machine, with no network (SPEC §2).

Starts `mta run` on a spool in a temp dir, plus simulated receiving MX servers on
loopback (one accepts and runs a feedback loop that sends ARF spam reports back, one
defers each message once, one rejects recipients as unknown, a slow one, and the
account owners' inbox), submits a campaign for each of the four sending domains, shows
delivery progress, and then tells the policy story: an account sending to an old list
is paused for its hard-bounce rate, its owner gets the notice, its queued mail is held,
and an admin's resume releases it. It ends with a report from the event feed, the
accounts' campaign rates and the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import aiosmtplib
from aiosmtpd.controller import Controller

from .cli import request

SENDING_DOMAINS = ("mlgnserv.com", "mlgn2ca.com", "mlgn2usa.com", "mailgait.com")
PER_CAMPAIGN = 250   # demo-shop, one welcome campaign per sending domain
BAD_CAMPAIGN = 150   # bulk-deals' old list
HELD_CAMPAIGN = 150  # bulk-deals' good campaign, held by the pause
BAD_SD = "mlgn2usa.com"


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class DemoMx:
    """A receiving MX: `accept`, `defer` (451 on the first try of each address), `bounce`
    (550 5.1.1) or `record` (accepts and keeps the messages: the account owners' inbox).

    An accepting MX with `fbl` set also runs a feedback loop: a message to a `complain*`
    address comes back as an ARF abuse report to its return path, as a mailbox provider's
    "report spam" button would send it."""

    def __init__(self, host: str, behaviour: str, fbl: tuple[str, int] | None = None):
        self.behaviour = behaviour
        self.fbl = fbl
        self.received = 0
        self.kept: list[bytes] = []
        self.tries: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.port = _free_port(host)
        self.controller = Controller(self, hostname=host, port=self.port, server_hostname=f"mx-{behaviour}.demo")
        self._reports: set[asyncio.Task[Any]] = set()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: Any) -> str:
        with self.lock:
            self.tries[address] += 1
            first = self.tries[address] == 1
        if self.behaviour == "bounce":
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if self.behaviour == "defer" and first:
            return "451 4.3.0 Greylisted, please try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.received += 1
            if self.behaviour == "record":
                self.kept.append(bytes(envelope.original_content))
        if self.fbl and any(r.startswith("complain") for r in envelope.rcpt_tos):
            task = asyncio.get_running_loop().create_task(self._report(envelope))
            self._reports.add(task)
            task.add_done_callback(self._reports.discard)
        return "250 2.0.0 Ok: queued"

    async def _report(self, envelope: Any) -> None:
        assert self.fbl is not None
        await asyncio.sleep(0.2)
        report = _arf(bytes(envelope.original_content), envelope.rcpt_tos[0], envelope.mail_from)
        try:
            await aiosmtplib.send(report, sender="fbl@accept.demo", recipients=[envelope.mail_from],
                                  hostname=self.fbl[0], port=self.fbl[1], timeout=10)
        except (aiosmtplib.SMTPException, OSError):
            pass  # the demo's report shows the complaints that did arrive

    def start(self) -> DemoMx:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop(no_assert=True)


def _arf(original: bytes, rcpt: str, to: str) -> bytes:
    """An RFC 5965 abuse report about `original`."""
    head = (f"From: Feedback Loop <fbl@accept.demo>\r\nTo: {to}\r\nSubject: Abuse report\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report; "
            'boundary="arf"\r\n\r\n--arf\r\nContent-Type: text/plain\r\n\r\n'
            "A user of accept.demo marked this message as spam.\r\n"
            "--arf\r\nContent-Type: message/feedback-report\r\n\r\n"
            f"Feedback-Type: abuse\r\nUser-Agent: demo-fbl/1.0\r\nVersion: 1\r\nOriginal-Rcpt-To: {rcpt}\r\n"
            "\r\n--arf\r\nContent-Type: message/rfc822\r\n\r\n")
    return head.encode() + original + b"\r\n--arf--\r\n"


def _job(job_id: str, account: str, campaign: str, sd: str, rcpts: list[dict[str, Any]],
         subject: str = "Welcome, {{name}}!") -> dict[str, Any]:
    return {"op": "submit", "job_id": job_id, "account": account, "campaign": campaign,
            "sending_domain": sd, "from": "Demo Shop <news@shop.example>", "subject": subject,
            "text": "Hello {{name}},\n\nthanks for joining the demo shop.\n",
            "html": "<p>Hello {{name}},</p><p>thanks for joining the demo shop.</p>",
            "list_unsubscribe_url": "https://shop.example/unsubscribe", "recipients": rcpts}


def _campaign(sd: str, n: int) -> dict[str, Any]:
    """demo-shop's welcome campaign: 2 % unknown users, greylisting, one spam report (late in
    the list, as reports come after the rest was delivered: 1 of 240 is under 0.5 %)."""
    rcpts = []
    for i in range(n):
        dest = "bounce.demo" if i % 50 == 0 else "defer.demo" if i % 5 == 0 else "accept.demo"
        local = "complain" if i == n - 2 else "reader"
        rcpts.append({"email": f"{local}{i:04d}.{sd.split('.')[0]}@{dest}", "vars": {"name": f"Reader {i}"}})
    return _job(f"demo-{sd}", "demo-shop", f"welcome-{sd}", sd, rcpts)


def _bad_account_jobs() -> list[dict[str, Any]]:
    """bulk-deals: an old bought list (one address in four is gone), and a good campaign
    to a slow receiver that is still queued when the first one gets the account paused."""
    old = [{"email": f"{'gone' if i % 4 == 0 else 'buyer'}{i:04d}@{'bounce' if i % 4 == 0 else 'accept'}.demo",
            "vars": {"name": f"Buyer {i}"}} for i in range(BAD_CAMPAIGN)]
    sale = [{"email": f"fan{i:04d}@slow.demo", "vars": {"name": f"Fan {i}"}} for i in range(HELD_CAMPAIGN)]
    return [_job("bulk-old-list", "bulk-deals", "old-list", BAD_SD, old, "Deals for {{name}}"),
            _job("bulk-spring-sale", "bulk-deals", "spring-sale", BAD_SD, sale, "Spring sale, {{name}}")]


def _events(control: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = 0
    while True:
        page = request(control, {"op": "events", "after": after, "limit": 5000})["result"]
        if not page["events"]:
            return events
        events += page["events"]
        after = page["next"]


def _notice_text(raw: bytes) -> dict[str, str]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    body = msg.get_body(("plain",))
    return {"from": str(msg["From"]), "to": str(msg["To"]), "subject": str(msg["Subject"]),
            "text": body.get_content() if body is not None else ""}  # type: ignore[attr-defined]


def _wait(what: Any, timeout: float, interval: float = 0.3) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = what()
        if value:
            return value
        time.sleep(interval)
    return what()


def main(keep: bool = False, json_out: bool = False) -> int:
    from rich.console import Console

    console = Console(stderr=json_out)
    workdir = Path(tempfile.mkdtemp(prefix="mta-demo-"))
    (workdir / "token.key").write_text(secrets.token_hex(32) + "\n")
    listener_port = _free_port()
    mxs = {"accept": DemoMx("127.0.0.2", "accept", fbl=("127.0.0.1", listener_port)),
           "defer": DemoMx("127.0.0.3", "defer"), "bounce": DemoMx("127.0.0.4", "bounce"),
           "slow": DemoMx("127.0.0.5", "accept"), "notify": DemoMx("127.0.0.6", "record")}
    for mx in mxs.values():
        mx.start()
    metrics_port = _free_port()
    template = Template(resources.files("mta").joinpath("data/demo.toml").read_text())
    config = workdir / "mta.toml"
    config.write_text(template.substitute(
        dir=workdir, metrics_port=metrics_port, listener_port=listener_port, dead_port=_free_port(),
        **{f"{name}_port": mx.port for name, mx in mxs.items()}))
    log = open(workdir / "daemon.log", "wb")  # noqa: SIM115 - the daemon writes it until the finally below
    daemon = subprocess.Popen([sys.executable, "-m", "mta", "run", "--config", str(config)], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return _tour(console, workdir, metrics_port, mxs, json_out)
    finally:
        daemon.terminate()
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        for mx in mxs.values():
            mx.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _tour(console: Any, workdir: Path, metrics_port: int, mxs: dict[str, DemoMx], json_out: bool) -> int:
    from rich.panel import Panel
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    control, submit = str(workdir / "control.sock"), str(workdir / "submit.sock")
    console.rule("[bold]mta demo")
    console.print(f"state and logs in {workdir}")
    if not _wait(lambda: os.path.exists(submit), 30, 0.1):
        console.print(f"[red]the daemon did not start; see {workdir / 'daemon.log'}")
        return 1
    console.print("daemon up; simulated MX servers: accept.demo (accepts; its feedback loop reports spam), "
                  "defer.demo (greylists once), bounce.demo (user unknown), slow.demo (25 messages/s), "
                  "notify.demo (the account owners' inbox)")
    for account_id in ("demo-shop", "bulk-deals"):
        request(control, {"op": "accounts.set", "id": account_id, "plan": "monthly", "subscribers": 5000,
                          "notify": f"{account_id}@notify.demo", "status": "active"})
    jobs = [_campaign(sd, PER_CAMPAIGN) for sd in SENDING_DOMAINS] + _bad_account_jobs()
    sd_of = {j["job_id"]: j["sending_domain"] for j in jobs}
    total = 0
    for j in jobs:
        answer = request(submit, j)
        total += int(answer.get("accepted", 0))
        console.print(f"submitted {j['account']}/{j['campaign']} via {j['sending_domain']}: "
                      f"accepted {answer.get('accepted')}")

    def status() -> dict[str, Any]:
        result: dict[str, Any] = request(control, {"op": "status"})["result"]
        return result

    def finished(s: dict[str, Any]) -> int:
        return int(s["totals"]["delivered"] + s["totals"]["bounced"] + s["totals"]["expired"])

    def account(account_id: str) -> dict[str, Any]:
        result: dict[str, Any] = request(control, {"op": "accounts.show", "id": account_id})["result"]
        return result

    def deliver(description: str, until: Any, timeout: float) -> dict[str, Any]:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      console=console) as progress:
            task = progress.add_task(description, total=total)
            end = time.monotonic() + timeout
            while True:
                s = status()
                progress.update(task, completed=min(finished(s), total))
                if until(s) or time.monotonic() > end:
                    return s
                time.sleep(0.3)

    # 1. everything goes out; bulk-deals' old list trips the hard-bounce threshold on the way
    s = deliver("delivering", lambda s: account("bulk-deals")["status"] == "paused"
                and s["queue"]["ready"] == 0 and s["queue"]["deferred"] == 0, 90)
    bad = account("bulk-deals")
    held = int(s["queue"]["held"])
    detail = bad.get("pause_detail") or {}
    if bad["status"] == "paused":
        console.print(f"[bold red]account bulk-deals paused[/bold red]: {bad['pause_reason']} "
                      f"{(detail.get('rate') or 0) * 100:.1f} % in campaign {detail.get('campaign')} "
                      f"({detail.get('count')} of {detail.get('sample')} attempted; its threshold is "
                      f"{(detail.get('threshold') or 0) * 100:.0f} %); {held} queued messages held, none dropped")
    # 2. the notice the account owner received, at once, through the daemon itself
    kept = _wait(lambda: list(mxs["notify"].kept), 15)
    notice = _notice_text(kept[0]) if kept else None
    if notice is not None and not json_out:
        console.print(Panel(notice["text"].rstrip(), title=f"notice to {notice['to']}: {notice['subject']}",
                            subtitle=f"from {notice['from']}", expand=False))
    submitted_while_paused = request(submit, _job("bulk-more", "bulk-deals", "more", BAD_SD,
                                                  [{"email": "x@accept.demo", "vars": {"name": "X"}}]))
    console.print("a new job from bulk-deals is refused: "
                  f"{(submitted_while_paused.get('error') or {}).get('code')}")
    # 3. an admin reviews the case and resumes the account: the held mail goes out
    request(control, {"op": "accounts.resume", "id": "bulk-deals"})
    console.print("[bold]mta accounts resume bulk-deals[/bold]: held mail released")
    s = deliver("releasing", lambda s: finished(s) >= total + len(kept), 90)
    done = min(finished(s), total)
    complaints = _wait(lambda: [e for e in _events(control) if e["type"] == "complained"], 10)
    events = _events(control)
    per_sd: dict[str, Counter[str]] = defaultdict(Counter)
    for e in events:
        if e["type"] in ("delivered", "deferred", "bounced", "expired") and e.get("job_id") in sd_of:
            per_sd[sd_of[e["job_id"]]][e["type"]] += 1
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        metrics_text = r.read().decode()
    order = ("mta_submitted_recipients_total", "mta_complaints_total", "mta_paused_accounts", "mta_bounces_total",
             "mta_deliveries_total")
    picked = sorted((line for line in metrics_text.splitlines() if line.startswith(order)),
                    key=lambda line: next(i for i, name in enumerate(order) if line.startswith(name)))
    shop = account("demo-shop")
    report = {"per_sending_domain": {sd: dict(c) for sd, c in per_sd.items()}, "submitted": total,
              "finished": done, "paused_accounts": [{"id": "bulk-deals", "reason": bad.get("pause_reason"),
                                                     "detail": detail}] if bad["status"] == "paused" else [],
              "held_at_pause": held, "notice": notice, "complaints": len(complaints),
              "status_after_resume": account("bulk-deals")["status"],
              "campaigns": {"demo-shop": shop["campaigns"], "bulk-deals": account("bulk-deals")["campaigns"]},
              "metrics": picked, "workdir": str(workdir)}
    if json_out:
        print(json.dumps(report))
    else:
        table = Table(title="delivery report")
        for col in ("sending domain", "delivered", "deferred (then retried)", "bounced"):
            table.add_column(col, justify="right" if col != "sending domain" else "left")
        for sd in SENDING_DOMAINS:
            c = per_sd.get(sd, Counter())
            table.add_row(sd, str(c["delivered"]), str(c["deferred"]), str(c["bounced"]))
        console.print(table)
        rates = Table(title="campaign rates (what the account policy judges)")
        for col in ("account", "campaign", "attempted", "hard bounces", "complaints"):
            rates.add_column(col, justify="left" if col in ("account", "campaign") else "right")
        for name, campaigns in report["campaigns"].items():  # type: ignore[attr-defined]
            for c in campaigns:
                rates.add_row(name, c["campaign"], str(c["attempted"]),
                              f"{c['hard']} ({(c['hard_bounce_rate'] or 0) * 100:.1f} %)",
                              f"{c['complaints']} ({(c['complaint_rate'] or 0) * 100:.2f} %)")
        console.print(rates)
        console.print(f"paused: bulk-deals ({bad.get('pause_reason')}), resumed by an admin; demo-shop stayed "
                      f"active: {len(complaints)} spam reports stay under the 0.5 % abuse threshold")
        console.print("[bold]a few metrics:[/bold]")
        for line in picked[:14]:
            console.print("  " + line, soft_wrap=True, highlight=False)
        console.print(f"{done}/{total} recipients finished "
                      f"({'complete' if done >= total else 'incomplete: see the daemon log'})")
    return 0 if done >= total and bad["status"] == "paused" and notice is not None else 1
