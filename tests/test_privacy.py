"""Data protection (SPEC §12) over real sockets: after the retention no address is left in
any file of the state directory or in the audit log (a byte scan of every file), account
deletion and erasure while mail waits for a retry, and the audit trail."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from mta.cli import request
from mta.control.service import parse_since

from .conftest import Daemon, job, poll_events, wait_for
from .sinks import Sink


def left_behind(d: Daemon, needles: list[str]) -> dict[str, list[str]]:
    """needle -> files under state_dir (and the audit log) whose bytes contain it, any case."""
    assert d.app is not None
    files = [Path(d.app.config.audit_log)]
    for root, _, names in os.walk(d.app.config.state_dir):
        files += [Path(root) / n for n in names]
    found: dict[str, list[str]] = {}
    for path in files:
        try:
            data = path.read_bytes().lower()
        except OSError:
            continue
        for needle in needles:
            if needle.lower().encode() in data:
                found.setdefault(needle, []).append(path.name)
    return found


async def control(d: Daemon, op: str, **fields: Any) -> dict[str, Any]:
    assert d.app is not None
    return await asyncio.to_thread(request, d.app.config.control_socket, {"op": op, **fields})


def recipients(tag: str, kinds: list[str], domain: str = "d.test") -> list[dict[str, Any]]:
    return [{"email": f"{kind}{i}{tag}@{domain}", "vars": {"name": f"Name{i}{tag}"}} for i, kind in enumerate(kinds)]


async def test_after_the_retention_no_address_is_left_and_hard_bounces_stay_suppressed(
        daemon_factory: Any, sink: Sink) -> None:
    d = await daemon_factory(static={"d.test": [sink.addr]}, extra='[privacy]\nretention = "2s"\n')
    await d.account()
    rcpts = recipients("Qz7", ["ok", "ok", "ok", "hard"])
    assert (await d.submit(job("r1", rcpts, campaign="ret")))["accepted"] == 4
    await poll_events(d, "bounced", 1)
    await wait_for(lambda: sum(sink.delivered().values()) == 3, 10)
    needles = [r["email"] for r in rcpts] + [r["email"].split("@")[0] for r in rcpts] + \
        [r["vars"]["name"] for r in rcpts]
    assert left_behind(d, needles)  # the event feed holds them for now
    await wait_for(lambda: not left_behind(d, needles), 20, interval=0.5)
    assert await d.events("delivered") == [] and len(await d.events("accepted")) == 1
    # the hard bounce (in session) is still suppressed, by its hash alone
    again = await d.submit(job("r2", [rcpts[3]], campaign="ret2"))
    assert again["rejected"][0]["code"] == "suppressed"
    # that answer names the address; once it is older than the retention, it does not
    await wait_for(lambda: not left_behind(d, [rcpts[3]["email"]]), 20, interval=0.5)
    listed = (await control(d, "suppress.list"))["result"]
    assert listed and all(e["address"] is None for e in listed)


async def test_delete_and_erase_while_mail_waits_then_the_audit_trail(daemon_factory: Any, sink: Sink) -> None:
    sink.defer_times = 100  # defer* wait for retries that never succeed
    d = await daemon_factory(static={"d.test": [sink.addr]}, retry=["1s"])
    await d.account("gone")
    await d.account("keep")
    doomed = recipients("Xy1", ["ok", "defer", "defer"])
    assert (await d.submit(job("g1", doomed, account="gone", campaign="g")))["accepted"] == 3
    target, other = recipients("Er9", ["defer", "ok"])
    assert (await d.submit(job("k1", [target, other], account="keep", campaign="k")))["accepted"] == 2
    await wait_for(lambda: sink.state.tries[doomed[1]["email"].lower()] and sink.state.tries[target["email"].lower()]
                   and sink.delivered()[other["email"].lower()], 10)

    deleted = await control(d, "accounts.delete", id="gone")
    assert deleted["ok"] and deleted["result"]["queued_cancelled"] == 2
    assert (await control(d, "accounts.show", id="gone"))["error"]["code"] == "unknown_account"
    erased = await control(d, "privacy.erase", address=target["email"].upper())
    assert erased["ok"] and erased["result"]["queued_cancelled"] == 1
    tries = dict(sink.state.tries)
    await asyncio.sleep(2.5)  # two retry intervals: nothing of it is tried again
    waiting = [r["email"].lower() for r in doomed[1:]] + [target["email"].lower()]
    assert all(sink.state.tries[a] == tries[a] for a in waiting)
    events = await d.events()
    assert [e["type"] for e in events if e.get("account") == "gone"] == ["account_deleted"]
    [erasure] = [e for e in events if e["type"] == "erased"]
    assert erasure["recipient_hash"] and "er9" not in str(events).lower().replace(other["email"].lower(), "")
    needles = [r["email"] for r in doomed] + [target["email"], target["email"].split("@")[0]]
    await wait_for(lambda: not left_behind(d, needles), 10, interval=0.5)
    # the erased address is suppressed for every account
    await d.account("acme")
    for account in ("keep", "acme"):
        answer = await d.submit(job(f"again-{account}", [target], account=account))
        assert answer["rejected"][0]["code"] == "suppressed"
    # the audit trail: who did what, when, how it ended; never the erased address
    records = (await control(d, "audit"))["result"]
    by_action = {r["action"]: r for r in records}
    for action in ("accounts.delete", "privacy.erase", "accounts.show"):
        assert by_action[action]["peer"]["uid"] == os.getuid() and by_action[action]["time"]
    assert by_action["accounts.delete"]["args"] == {"id": "gone"} and by_action["accounts.delete"]["result"] == "ok"
    assert by_action["accounts.show"]["result"] == "error" and by_action["accounts.show"]["error"] == "unknown_account"
    assert "address_hash" in by_action["privacy.erase"]["args"]
    assert d.app is not None
    assert target["email"].lower().encode() not in Path(d.app.config.audit_log).read_bytes().lower()
    assert (await control(d, "audit", since="1h"))["result"][-1]["action"] == "audit"
    assert (await control(d, "audit", since="2099-01-01"))["result"] == []


def test_since_takes_a_time_or_a_duration() -> None:
    assert parse_since("2h", 10_000.0) == 10_000.0 - 7200
    assert parse_since("2026-11-22T10:00:00Z", 0) == parse_since("2026-11-22T10:00:00+00:00", 0)
    with pytest.raises(ValueError):
        parse_since("yesterday", 0)
