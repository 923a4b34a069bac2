"""`mta demo`: a self-contained tour on this machine, with no network (SPEC §2).

Starts `mta run` on a spool in a temp dir, plus three simulated receiving MX servers on
loopback (one accepts, one defers each message once, one rejects recipients as
unknown), submits a campaign for each of the four sending domains, shows delivery
progress, and ends with a report from the event feed and the metrics endpoint.
"""

from __future__ import annotations

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

from aiosmtpd.controller import Controller

from .cli import request

SENDING_DOMAINS = ("mlgnserv.com", "mlgn2ca.com", "mlgn2usa.com", "mailgait.com")
PER_CAMPAIGN = 120


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class DemoMx:
    """A receiving MX: `accept`, `defer` (451 on the first try of each address) or `bounce` (550 5.1.1)."""

    def __init__(self, host: str, behaviour: str):
        self.behaviour = behaviour
        self.received = 0
        self.tries: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.port = _free_port(host)
        self.controller = Controller(self, hostname=host, port=self.port, server_hostname=f"mx-{behaviour}.demo")

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
        return "250 2.0.0 Ok: queued"


def _campaign(sd: str, n: int) -> dict[str, Any]:
    rcpts = []
    for i in range(n):
        dest = "bounce.demo" if i % 20 == 0 else "defer.demo" if i % 5 == 0 else "accept.demo"
        rcpts.append({"email": f"reader{i:04d}.{sd.split('.')[0]}@{dest}", "vars": {"name": f"Reader {i}"}})
    return {"op": "submit", "job_id": f"demo-{sd}", "account": "demo-shop", "campaign": f"welcome-{sd}",
            "sending_domain": sd, "from": "Demo Shop <news@shop.example>", "subject": "Welcome, {{name}}!",
            "text": "Hello {{name}},\n\nthanks for joining the demo shop.\n",
            "html": "<p>Hello {{name}},</p><p>thanks for joining the demo shop.</p>",
            "list_unsubscribe_url": "https://shop.example/unsubscribe", "recipients": rcpts}


def main(keep: bool = False, json_out: bool = False) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.table import Table

    console = Console(stderr=json_out)
    workdir = Path(tempfile.mkdtemp(prefix="mta-demo-"))
    (workdir / "token.key").write_text(secrets.token_hex(32) + "\n")
    mxs = {"accept": DemoMx("127.0.0.2", "accept"), "defer": DemoMx("127.0.0.3", "defer"),
           "bounce": DemoMx("127.0.0.4", "bounce")}
    for mx in mxs.values():
        mx.controller.start()
    metrics_port = _free_port()
    template = Template(resources.files("mta").joinpath("data/demo.toml").read_text())
    config = workdir / "mta.toml"
    config.write_text(template.substitute(
        dir=workdir, metrics_port=metrics_port, listener_port=_free_port(), dead_port=_free_port(),
        accept_port=mxs["accept"].port, defer_port=mxs["defer"].port, bounce_port=mxs["bounce"].port))
    log = open(workdir / "daemon.log", "wb")  # noqa: SIM115 - the daemon writes it until the finally below
    daemon = subprocess.Popen([sys.executable, "-m", "mta", "run", "--config", str(config)], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    control, submit = str(workdir / "control.sock"), str(workdir / "submit.sock")
    try:
        console.rule("[bold]mta demo")
        console.print(f"state and logs in {workdir}")
        end = time.monotonic() + 30
        while not os.path.exists(submit):
            if daemon.poll() is not None or time.monotonic() > end:
                console.print(f"[red]the daemon did not start; see {workdir / 'daemon.log'}")
                return 1
            time.sleep(0.1)
        console.print("daemon up; simulated MX servers: accept.demo (accepts), defer.demo (greylists once), "
                      "bounce.demo (user unknown)")
        request(control, {"op": "accounts.set", "id": "demo-shop", "plan": "monthly", "subscribers": 5000,
                          "notify": "owner@shop.example", "status": "active"})
        total = 0
        for sd in SENDING_DOMAINS:
            answer = request(submit, _campaign(sd, PER_CAMPAIGN))
            total += int(answer.get("accepted", 0))
            console.print(f"submitted campaign for {sd}: accepted {answer.get('accepted')}")
        done = 0
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      console=console) as progress:
            task = progress.add_task("delivering", total=total)
            end = time.monotonic() + 90
            while done < total and time.monotonic() < end:
                totals = request(control, {"op": "status"})["result"]["totals"]
                done = totals["delivered"] + totals["bounced"] + totals["expired"]
                progress.update(task, completed=done)
                time.sleep(0.3)
        events: list[dict[str, Any]] = []
        after = 0
        while True:
            page = request(control, {"op": "events", "after": after, "limit": 5000})["result"]
            if not page["events"]:
                break
            events += page["events"]
            after = page["next"]
        per_sd: dict[str, Counter[str]] = defaultdict(Counter)
        for e in events:
            sd = e.get("campaign", "").removeprefix("welcome-")
            if e["type"] in ("delivered", "deferred", "bounced", "expired"):
                per_sd[sd][e["type"]] += 1
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            metrics_text = r.read().decode()
        picked = [line for line in metrics_text.splitlines()
                  if line.startswith(("mta_deliveries_total", "mta_submitted_recipients_total",
                                      "mta_bounces_total"))]
        report = {"per_sending_domain": {sd: dict(c) for sd, c in per_sd.items()}, "submitted": total,
                  "finished": done, "paused_accounts": [], "metrics": picked, "workdir": str(workdir)}
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
            console.print("paused accounts: none (account policy arrives with a later release)")
            console.print("[bold]a few metrics:[/bold]")
            for line in picked[:12]:
                console.print("  " + line, soft_wrap=True, highlight=False)
            console.print(f"{done}/{total} recipients finished "
                          f"({'complete' if done >= total else 'incomplete: see the daemon log'})")
        return 0 if done >= total else 1
    finally:
        daemon.terminate()
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        for mx in mxs.values():
            mx.controller.stop(no_assert=True)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
