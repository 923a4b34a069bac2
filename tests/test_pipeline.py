"""The running daemon end to end over real sockets: submit -> spool -> delivery -> events."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

from .conftest import Client, job, poll_events, wait_for
from .sinks import Sink


async def test_delivers_each_recipient_once_with_retries_and_bounces(daemon_factory: Any, sink: Sink) -> None:
    d = await daemon_factory(static={"d.test": [sink.addr]})
    await d.account()
    rcpts = [f"ok{i}@d.test" for i in range(20)] + ["defer1@d.test", "hard1@d.test", "drop1@d.test"]
    answer = await d.submit(job("j1", rcpts))
    assert answer == {"ok": True, "job_id": "j1", "accepted": 23, "rejected": []}
    expected = [r for r in rcpts if not r.startswith("hard")]
    await wait_for(lambda: all(sink.delivered()[r] for r in expected), 30)
    await asyncio.sleep(0.3)
    counts = sink.delivered()
    assert all(counts[r] == 1 for r in expected) and counts["hard1@d.test"] == 0
    assert sink.state.tries["defer1@d.test"] == 2 and sink.state.tries["drop1@d.test"] == 2
    bounced = await d.events("bounced")
    assert [(e["recipient"], e["kind"], e["reason"]) for e in bounced] == [("hard1@d.test", "hard", "userunknown")]
    assert "550 5.1.1" in bounced[0]["code"]
    deferred = {e["recipient"] for e in await d.events("deferred")}
    assert deferred == {"defer1@d.test", "drop1@d.test"}
    assert len(await d.events("delivered")) == len(expected)
    # every message carries its own VERP return path on the bounce domain
    froms = {m.mail_from for m in sink.messages()}
    assert len(froms) == len(expected) and all(f.endswith("@bounces.mlgnserv.com") for f in froms)
    # the accounting log: one line per final outcome, no addresses
    d.app.results.flush()
    from pathlib import Path

    def accounted() -> list[dict[str, Any]]:
        return [json.loads(x) for f in Path(d.app.config.state_dir, "accounting").glob("acct-*.jsonl")
                for x in f.read_text().splitlines()]

    await wait_for(lambda: len(accounted()) == len(expected) + 1, 10)  # written by the log's own thread
    lines = accounted()
    assert sorted(x["result"] for x in lines) == ["bounced"] + ["delivered"] * len(expected)
    assert all("@" not in json.dumps(x) and x["account"] == "acme" for x in lines)


async def test_protocol_errors_and_idempotency(daemon_factory: Any, sink: Sink) -> None:
    d = await daemon_factory(static={"d.test": [sink.addr]})
    await d.account()
    c = await d.client()
    first = await c.request(job("idem", ["ok1@d.test", "bad@"]))
    assert first["accepted"] == 1 and first["rejected"][0]["code"] == "invalid_address"
    assert await c.request(job("idem", ["ok1@d.test", "bad@"])) == first
    assert (await c.request(job("idem", ["ok2@d.test"])))["error"]["code"] == "duplicate_job"
    await c.send_raw(b'{"op": "submit", "job_id": "x", "recipients": [')
    assert (await c.read())["error"]["code"] == "malformed_request"
    await c.send_raw(b"\xff\xfe not json")
    assert (await c.read())["error"]["code"] == "malformed_request"
    assert (await c.request({"op": "launch"}))["error"]["code"] == "unknown_op"
    assert (await c.request(job("u", ["ok@d.test"], account="nobody")))["error"]["code"] == "unknown_account"
    assert (await c.request(job("s", ["ok@d.test"], sending_domain="evil.com")))["error"]["code"] \
        == "unmanaged_sending_domain"
    assert (await c.request(job("h", ["ok@d.test"], subject="x\r\nBcc: a@b")))["error"]["code"] == "header_injection"
    assert (await c.request({"op": "submit", "job_id": 5}))["error"]["code"] == "malformed_request"
    assert await c.request({"op": "ping"}) == {"ok": True}
    # pipelined: answers come back in request order
    for i in range(10):
        await c.send_raw(json.dumps(job(f"p{i}", [f"ok-p{i}@d.test"])).encode())
    answers = [await c.read() for _ in range(10)]
    assert [a["job_id"] for a in answers] == [f"p{i}" for i in range(10)]
    await c.close()
    await wait_for(lambda: sum(sink.delivered().values()) == 11, 20)
    await asyncio.sleep(0.5)
    assert sink.delivered()["ok1@d.test"] == 1  # the resubmission sent nothing twice


async def test_new_accounts_are_held_until_approved(daemon_factory: Any, sink: Sink) -> None:
    d = await daemon_factory(static={"d.test": [sink.addr]})
    await d.app.accounts.set("fresh", {"plan": "monthly", "subscribers": 10, "notify": "o@f.test"})
    assert d.app.accounts.get("fresh").status == "review"
    assert (await d.submit(job("r1", ["ok1@d.test", "ok2@d.test"], account="fresh")))["accepted"] == 2
    await asyncio.sleep(1.0)
    assert not sink.delivered()
    await d.app.accounts.set_status("fresh", "active")
    await wait_for(lambda: len(sink.delivered()) == 2, 20)


async def test_paused_account_refuses_jobs_and_holds_mail(daemon_factory: Any, sink: Sink) -> None:
    d = await daemon_factory(static={"d.test": [sink.addr]})
    await d.account()
    await d.app.accounts.set_status("acme", "paused", "paused by an admin")
    answer = await d.submit(job("pz", ["ok1@d.test"]))
    assert answer["error"]["code"] == "account_paused"
    assert [e["type"] for e in await d.events() if e["type"] in ("paused", "resumed")] == ["paused"]


async def test_expiry_bounces_after_max_age(daemon_factory: Any) -> None:
    stubborn = Sink("127.0.0.4", defer_times=1000).start()
    try:
        d = await daemon_factory(static={"e.test": [stubborn.addr]}, retry=["1s"], max_age="2s")
        await d.account()
        await d.submit(job("ex", ["defer-x@e.test"]))
        expired = await poll_events(d, "expired", 1)
        assert expired and expired[0]["recipient"] == "defer-x@e.test" and expired[0]["reason"] == "expired"
        assert stubborn.state.tries["defer-x@e.test"] >= 2
    finally:
        stubborn.stop()


async def test_unreachable_site_defers_everything(daemon_factory: Any) -> None:
    d = await daemon_factory(static={"gone.test": ["127.0.0.5:9"]})
    await d.account()
    await d.submit(job("g", [f"ok{i}@gone.test" for i in range(5)]))
    events = await poll_events(d, "deferred", 5)
    assert len(events) >= 5 and all(e["reason"] == "networkerror" for e in events)
    assert not await d.events("bounced")


async def test_restart_recovers_queued_mail(daemon_factory: Any, sink: Sink) -> None:
    stubborn = Sink("127.0.0.4", defer_times=1).start()
    try:
        d = await daemon_factory(static={"d.test": [stubborn.addr]}, retry=["3s"])
        await d.account()
        await d.submit(job("rs", [f"defer{i}@d.test" for i in range(5)]))
        await wait_for(lambda: len(stubborn.state.tries) == 5, 10)
        await d.stop()
        await d.start()
        await wait_for(lambda: len(stubborn.delivered()) == 5, 20)
        assert all(n == 1 for n in stubborn.delivered().values())
    finally:
        stubborn.stop()


async def test_metrics_and_health(daemon_factory: Any, sink: Sink) -> None:
    d = await daemon_factory(static={"d.test": [sink.addr]})
    await d.account()
    await d.submit(job("m", ["ok@d.test", "hard@d.test"]))
    await wait_for(lambda: sink.delivered(), 10)
    host, port = d.app.config.metrics_listen

    def get(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()

    status, text = await asyncio.to_thread(get, "/metrics")
    assert status == 200
    for name in ("mta_submitted_jobs_total", "mta_deliveries_total", "mta_queue_depth",
                 "mta_delivery_latency_seconds_bucket"):
        assert name in text
    assert "@" not in "".join(line for line in text.splitlines() if not line.startswith("#"))
    assert (await asyncio.to_thread(get, "/healthz"))[0] == 200


async def test_large_job_in_one_durable_write(daemon_factory: Any, sink: Sink) -> None:
    d = await daemon_factory(static={"d.test": [sink.addr]})
    await d.account()
    commits = d.app.spool.commits
    answer = await d.submit(job("big", [{"email": f"ok{i}@d.test", "vars": {"name": str(i)}} for i in range(5000)]))
    assert answer["accepted"] == 5000
    # group commit: one job of 5,000 recipients is a handful of commits, not thousands
    assert d.app.spool.commits - commits < 50
    c: Client = await d.client()
    await c.close()


async def test_idn_and_smtputf8(daemon_factory: Any, sink: Sink) -> None:
    utf8 = Sink("127.0.0.7", smtputf8=True).start()
    try:
        d = await daemon_factory(static={"xn--bcher-kva.test": [sink.addr], "u.test": [utf8.addr]})
        await d.account()
        answer = await d.submit(job("idn", ["ok@bücher.test", "jörg@bücher.test", "jörg@u.test"]))
        assert answer["accepted"] == 3
        await wait_for(lambda: sink.delivered()["ok@xn--bcher-kva.test"] == 1, 20)  # IDNA A-label for DNS/SMTP
        await wait_for(lambda: utf8.delivered()["jörg@u.test"] == 1, 20)  # SMTPUTF8 offered: delivered
        bounced = (await poll_events(d, "bounced", 1))[0]  # not offered: a clear permanent failure
        assert bounced["recipient"] == "jörg@xn--bcher-kva.test" and "5.6.7" in bounced["code"]
    finally:
        utf8.stop()


async def test_reject_at_data_and_a_stall_within_the_timeout(daemon_factory: Any) -> None:
    staller = Sink("127.0.0.9", stall=0.5).start()
    try:
        d = await daemon_factory(static={"s.test": [staller.addr]})
        await d.account()
        await d.submit(job("st", ["slow1@s.test", "data1@s.test", "ok1@s.test"]))
        await wait_for(lambda: len(staller.delivered()) == 2, 20)
        bounced = await poll_events(d, "bounced", 1)
        assert bounced[0]["recipient"] == "data1@s.test" and "554 5.6.0" in bounced[0]["code"]
        assert bounced[0]["kind"] == "soft"  # content rejected says nothing permanent about the address
    finally:
        staller.stop()


async def test_a_reset_in_the_middle_of_data_is_not_counted_delivered(daemon_factory: Any, sink: Sink) -> None:
    d = await daemon_factory(static={"r.test": [sink.addr]})
    await d.account()
    await d.submit(job("rs", ["reset1@r.test", "ok1@r.test"]))
    await wait_for(lambda: len(sink.delivered()) == 2, 20)
    deferred = await poll_events(d, "deferred", 1)
    assert deferred[0]["recipient"] == "reset1@r.test"  # the message was sent whole, then the reset
    delivered = await poll_events(d, "delivered", 2)
    assert sorted(e["recipient"] for e in delivered) == ["ok1@r.test", "reset1@r.test"]
    assert sink.delivered()["reset1@r.test"] == 1  # the retry, once


def _self_signed(tmp: Any) -> Any:
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.tls.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return ctx


async def test_opportunistic_starttls(daemon_factory: Any, tmp_path: Any) -> None:
    tls = Sink("127.0.0.10", tls_context=_self_signed(tmp_path)).start()
    try:
        d = await daemon_factory(static={"tls.test": [tls.addr]})
        await d.account()
        await d.submit(job("tls", ["ok1@tls.test", "ok2@tls.test"]))
        await wait_for(lambda: len(tls.delivered()) == 2, 20)
        assert tls.state.tls_sessions == 2  # offered STARTTLS was used (self-signed: not verified)
    finally:
        tls.stop()


async def test_failed_tls_handshake_falls_back_to_plain_and_is_counted(daemon_factory: Any, tmp_path: Any) -> None:
    """A receiver that offers STARTTLS but cannot complete the handshake (here: it demands a
    client certificate) still gets its mail, in the clear, and the fallback is counted."""
    import ssl

    from mta import metrics

    ctx = _self_signed(tmp_path)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(tmp_path / "cert.pem")
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # so that the missing certificate fails the handshake itself
    broken = Sink("127.0.0.11", tls_context=ctx).start()
    try:
        before = metrics.TLS_FALLBACKS.labels("mlgnserv.com")._value.get()
        d = await daemon_factory(static={"tls.test": [broken.addr]})
        await d.account()
        await d.submit(job("tls", ["ok1@tls.test", "ok2@tls.test", "ok3@tls.test"]))
        await wait_for(lambda: len(broken.delivered()) == 3, 20)
        assert broken.state.tls_sessions == 0
        # counted per connection that tried (up to three at once); none of the mail was deferred
        assert 1 <= metrics.TLS_FALLBACKS.labels("mlgnserv.com")._value.get() - before <= 3
        assert [e["type"] for e in await d.events("deferred")] == []
    finally:
        broken.stop()


async def test_an_unreadable_spool_record_is_quarantined_not_a_crash(daemon_factory: Any, sink: Sink) -> None:
    import sqlite3

    d = await daemon_factory(static={"d.test": [sink.addr]})
    await d.account(status="review")  # held: the records are damaged before anything is sent
    assert (await d.submit(job("j1", ["ok1@d.test", "ok2@d.test", "ok3@d.test"])))["accepted"] == 3
    assert (await d.submit(job("j2", ["ok4@d.test"])))["accepted"] == 1
    assert d.app is not None
    with sqlite3.connect(Path(d.app.config.state_dir) / "spool.db") as db:
        db.execute("UPDATE recipients SET vars = x'ff00ff' WHERE email = 'ok2@d.test'")
        db.execute("UPDATE jobs SET template = x'7b7b' WHERE job_id = 'j2'")
    await d.app.accounts.set_status("acme", "active")
    bounced = await poll_events(d, "bounced", 2)
    by_rcpt = {e["recipient"]: e for e in bounced}
    assert by_rcpt["ok2@d.test"]["reason"] == "systemerror" and "quarantined" in by_rcpt["ok2@d.test"]["code"]
    assert by_rcpt["ok4@d.test"]["code"].startswith("554 5.3.0")  # its template: not renderable
    await wait_for(lambda: sink.delivered()["ok1@d.test"] and sink.delivered()["ok3@d.test"], 10)
    assert "ok2@d.test" not in sink.delivered() and (await d.submit({"op": "ping"}))["ok"] is True


async def test_a_full_disk_answers_unavailable_and_recovers(daemon_factory: Any, sink: Sink) -> None:
    """SQLITE_FULL (what ENOSPC becomes), made real by capping the database's page count."""
    d = await daemon_factory(static={"d.test": [sink.addr]})
    await d.account()
    assert d.app is not None
    spool = d.app.spool
    pages = spool.reader.execute("PRAGMA page_count").fetchone()[0]
    await spool.transact(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages + 2}"))
    big = [f"ok{i}-{'x' * 40}@d.test" for i in range(3000)]
    full = await d.submit(job("full", big))
    assert full["error"]["code"] == "unavailable" and "full" in full["error"]["message"]
    assert spool.last_error and (await d.submit({"op": "ping"}))["ok"] is True
    await spool.transact(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))
    again = await d.submit(job("full", big))  # the same job_id: nothing of the refused one was kept
    assert again["accepted"] == 3000
    await wait_for(lambda: len(sink.delivered()) == 3000, 60)


async def test_a_large_job_is_walked_in_chunks_end_to_end(daemon_factory: Any, sink: Sink,
                                                          monkeypatch: Any) -> None:
    """Over the socket, a line above LARGE_LINE takes the chunked path (thresholds lowered so
    that a small job does): every good recipient delivered once, the bad ones rejected with
    their index, a retry replayed, a bad recipient named by its place in the line."""
    from mta.submit import job as jobs

    monkeypatch.setattr(jobs, "LARGE_LINE", 100)
    monkeypatch.setattr(jobs, "CHUNK", 7)
    large_lines: list[int] = []
    decode_large = jobs._decode_large

    def counted(line: bytes) -> jobs.LargeJobIn:
        large_lines.append(len(line))
        return decode_large(line)

    monkeypatch.setattr(jobs, "_decode_large", counted)
    d = await daemon_factory(static={"d.test": [sink.addr]})
    await d.account()
    rcpts = [f"ok{i}@d.test" for i in range(30)] + ["bad address", "ok3@d.test"]
    body = job("large", rcpts)
    first = await d.submit(body)
    assert first["ok"] is True and first["accepted"] == 30
    rejected = [(r["index"], r["code"]) for r in first["rejected"]]
    assert rejected == [(30, "invalid_address"), (31, "duplicate_recipient")]
    assert await d.submit(body) == first  # the same job again: the first answer
    await wait_for(lambda: all(sink.delivered()[f"ok{i}@d.test"] == 1 for i in range(30)), 30)
    broken = job("broken", [f"x{i}@d.test" for i in range(20)])
    broken["recipients"][15] = {"email": ["not", "a", "string"]}
    answer = await d.submit(broken)
    assert answer["ok"] is False and answer["error"]["code"] == "malformed_request"
    assert "$.recipients[15].email" in answer["error"]["message"] and answer["job_id"] == "broken"
    assert len(large_lines) == 3  # each of the three lines took the chunked path
