"""Pure parts: tokens, GCRA with an injected clock, job validation, shaping rule matching."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from mta.config import ShapingRule
from mta.submit.job import JobIn, Refused, prepare, split_address
from mta.throttle.gcra import Gcra, default_burst
from mta.throttle.shaping import RuleBook
from mta.tokens import BOUNCE, UNSUBSCRIBE, TokenSigner

KEY = b"k" * 32


def test_token_round_trip_and_forgery() -> None:
    signer = TokenSigner(KEY)
    token = signer.make(BOUNCE, 12345, 987654321)
    ref = signer.verify(token)
    assert ref is not None and (ref.purpose, ref.job, ref.recipient) == (BOUNCE, 12345, 987654321)
    assert signer.verify(token.upper()) == ref  # remote MTAs may change the case
    for i in range(len(token)):  # any single changed character is refused
        c = token[i]
        forged = token[:i] + ("a" if c != "a" else "b") + token[i + 1:]
        assert signer.verify(forged) is None
    assert TokenSigner(b"x" * 32).verify(token) is None
    assert signer.verify("") is None and signer.verify("!!!") is None
    assert len("b-" + signer.make(UNSUBSCRIBE, 2**40, 2**50)) < 64  # RFC 5321 local-part limit


@pytest.mark.parametrize("key", [KEY, b"s" * 16, b"L" * 64, bytes(range(100))])
def test_address_hash_and_token_mac_are_hmac_sha256(key: bytes) -> None:
    # the hashes stored in spools and suppression lists must not change with the
    # implementation (the MAC is built from two pre-keyed SHA-256 states, RFC 2104)
    signer = TokenSigner(key)
    for address in ("User@Example.COM ", "ü@bücher.de", ""):
        expected = hmac.new(key, b"addr:" + address.strip().lower().encode(), hashlib.sha256).hexdigest()[:32]
        assert signer.address_hash(address) == expected
    token = signer.make(BOUNCE, 7, 9)
    assert TokenSigner(key).verify(token) is not None
    payload = bytes((BOUNCE, 0, 7, 9))
    assert signer._mac(payload) == hmac.new(key, payload, hashlib.sha256).digest()[:10]


def test_gcra_holds_the_rate_with_an_injected_clock() -> None:
    g = Gcra(rate=10.0, burst=1)
    now, sent = 1000.0, 0
    while now < 1060.0:
        wait = g.acquire(now)
        if wait == 0:
            sent += 1
        else:
            now += wait
    assert sent == pytest.approx(600, abs=6)  # within 1 %


def test_gcra_burst_and_retry_after() -> None:
    g = Gcra(rate=100.0, burst=5)
    assert [g.acquire(0.0) for _ in range(5)] == [0.0] * 5
    wait = g.acquire(0.0)
    assert wait == pytest.approx(0.01)
    assert g.acquire(0.0 + wait) == 0.0
    assert default_burst(10.0) == 1 and default_burst(1000.0) == 50


def test_rule_matching_by_domain_then_mx_then_default() -> None:
    google = ShapingRule("google", (".google.com",), ("gmail.com",), 20, 100, 5.0)
    default = ShapingRule("default", (), (), 10, 100, 10.0)
    book = RuleBook([google, default])
    assert book.match("gmail.com", []).provider == "google"
    assert book.match("acme.com", ["aspmx.l.google.com"]).provider == "google"
    assert book.match("acme.com", ["mx.acme.com"]).provider == "default"
    assert RuleBook([google]).match("x.com", []).max_rate is None  # no default rule: unthrottled


def _job(**fields: object) -> JobIn:
    base: dict[str, object] = {"job_id": "j", "account": "a", "sending_domain": "mlgnserv.com",
                               "from": "A <a@a.example>", "subject": "Hi {{name}}", "text": "Hello {{name}}",
                               "recipients": [{"email": "ann@x.test", "vars": {"name": "Ann"}}]}
    base.update(fields)
    import msgspec

    return msgspec.convert(base, JobIn)


def _prepare(job: JobIn, size: int = 1 << 20) -> object:
    return prepare(job, max_recipients=100, max_message_size=size, address_hash=lambda a: a)


@pytest.mark.parametrize("fields", [
    {"subject": "Hi\r\nBcc: x@y"}, {"from": "A <a@a.example>\nX: y"}, {"headers": {"X-T": "a\x00b"}},
    {"headers": {"X-T\r\nBcc": "a"}},
])
def test_header_injection_in_job_fields(fields: dict[str, object]) -> None:
    with pytest.raises(Refused) as err:
        _prepare(_job(**fields))
    assert err.value.code == "header_injection"


def test_per_recipient_rejections() -> None:
    job = _job(recipients=[
        {"email": "ok@x.test", "vars": {"name": "A"}},
        {"email": "no-at-sign", "vars": {"name": "B"}},
        {"email": "missing@x.test", "vars": {}},
        {"email": "evil@x.test", "vars": {"name": "E\r\nBcc: victim@x.test"}},
        {"email": "OK@x.test", "vars": {"name": "dup"}},
    ])
    p = _prepare(job)
    assert [r[1] for r in p.rows()] == ["ok@x.test"]  # type: ignore[attr-defined]
    codes = [r["code"] for r in p.rejected]  # type: ignore[attr-defined]
    assert codes == ["invalid_address", "missing_variable", "header_injection", "duplicate_recipient"]


def test_whole_job_refusals() -> None:
    with pytest.raises(Refused, match="at least"):
        _prepare(_job(text="x" * 5000), size=2048)
    with pytest.raises(Refused) as err:
        prepare(_job(recipients=[{"email": f"a{i}@x.test", "vars": {"name": "n"}} for i in range(3)]),
                max_recipients=2, max_message_size=1 << 20, address_hash=lambda a: a)
    assert err.value.code == "too_many_recipients"
    with pytest.raises(Refused) as err:
        _prepare(_job(headers={"From": "x"}))
    assert err.value.code == "malformed_request"


def test_addresses_and_idn() -> None:
    assert split_address("Ann@Example.TEST") == ("Ann", "example.test")
    assert split_address("ann@bücher.test") == ("ann", "xn--bcher-kva.test")
    for bad in ("a@", "@x.test", "a b@x.test", "a@x", "a@-x.test", "a..b@x.test"):
        assert split_address(bad) is None


def test_a_large_job_walked_in_chunks_is_the_same_job(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LargeJobIn (recipients kept as raw JSON, decoded a chunk at a time) has the digest,
    rows and rejections of the JobIn decoded from the same line."""
    import msgspec

    from mta.submit import job as jobs

    monkeypatch.setattr(jobs, "CHUNK", 4)
    rcpts: list[dict[str, object]] = [{"vars": {"name": f"n{i}"}, "email": f"u{i}@d{i % 3}.test"} for i in range(11)]
    rcpts[2] = {"email": "not an address", "vars": {"name": "x"}}
    rcpts[5] = {"email": "u1@d1.test", "vars": {"name": "again"}}     # a duplicate across chunks
    rcpts[9] = {"email": "u9@d0.test", "vars": {}}                    # a missing variable
    line = msgspec.json.encode({"op": "submit", "job_id": "big", "account": "a", "sending_domain": "mlgnserv.com",
                                "from": "A <a@a.example>", "subject": "Hi {{name}}", "text": "{{name}}",
                                "recipients": rcpts})
    small, large = jobs._decode_job(line), jobs._decode_large(line)
    assert isinstance(large, jobs.LargeJobIn) and len(large.recipients) == 11
    assert jobs.job_digest(large) == jobs.job_digest(small)
    both = [prepare(j, max_recipients=100, max_message_size=1 << 20, address_hash=str.upper)
            for j in (small, large)]
    assert list(both[1].rows()) == list(both[0].rows()) and len(list(both[0].rows())) == 8
    assert both[1].rejected == both[0].rejected
    assert [r["index"] for r in both[0].rejected] == [2, 5, 9]
    assert both[1].domains == both[0].domains == [row[2] for row in both[0].rows()]
    assert both[1].kept is None  # nothing per recipient is kept for the large form


def test_numbers_booleans_and_nulls_among_variables_become_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines are decoded with text variables first; one with other JSON values takes the
    loose form. Either way (and in either size of job) the rows carry text, and the digest
    is that of the line's own values."""
    import msgspec

    from mta.submit import job as jobs

    monkeypatch.setattr(jobs, "CHUNK", 2)
    rcpts: list[dict[str, object]] = [{"email": f"u{i}@x.test", "vars": {"name": f"n{i}"}} for i in range(5)]
    rcpts[3]["vars"] = {"name": 7, "vip": True, "note": None, "score": 1.5}
    line = msgspec.json.encode({"job_id": "j", "account": "a", "sending_domain": "mlgnserv.com",
                                "from": "a@a.example", "subject": "Hi {{name}}", "text": "t", "recipients": rcpts})
    small, large = jobs._decode_job(line), jobs._decode_large(line)
    assert isinstance(small, jobs.LooseJobIn)
    assert isinstance(jobs._decode_job(line.replace(b"7", b'"7"').replace(b"true", b'"x"').replace(
        b"null", b'"y"').replace(b"1.5", b'"z"')), jobs.JobIn)
    assert jobs.job_digest(small) == jobs.job_digest(large)
    assert jobs.job_digest(small) != jobs.job_digest(jobs._decode_job(line.replace(b"7", b'"7"')))
    for form in (small, large):
        p = prepare(form, max_recipients=10, max_message_size=1 << 20, address_hash=str.upper)
        rows = list(p.rows())
        assert len(rows) == 5 and not p.rejected
        assert msgspec.json.decode(rows[3][3]) == {"name": "7", "vip": "True", "note": "", "score": "1.5"}
        assert msgspec.json.decode(rows[0][3]) == {"name": "n0"}
    bad = line.replace(b'"u4@x.test"', b"4")
    with pytest.raises(msgspec.ValidationError, match=r"recipients\[4\]\.email"):
        jobs.decode_job(bad)


def test_a_large_job_names_a_bad_recipient_by_its_place_in_the_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import msgspec

    from mta.submit import job as jobs

    monkeypatch.setattr(jobs, "CHUNK", 4)
    rcpts: list[object] = [{"email": f"u{i}@x.test"} for i in range(10)]
    rcpts[6] = {"email": 42}
    line = msgspec.json.encode({"job_id": "big", "account": "a", "sending_domain": "mlgnserv.com",
                                "from": "a@a.example", "subject": "s", "text": "t", "recipients": rcpts})
    with pytest.raises(Refused) as exc:
        jobs.job_digest(jobs._decode_large(line))
    assert exc.value.code == "malformed_request" and "$.recipients[6].email" in exc.value.message


def test_memory_is_given_back_at_most_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    from mta import memory

    calls: list[int] = []
    monkeypatch.setattr(memory, "_trim", calls.append)
    monkeypatch.setattr(memory, "_last", 0.0)
    now = [100.0]
    assert memory.trim_soon(lambda: now[0]) and calls == [0]
    now[0] += 0.5
    assert not memory.trim_soon(lambda: now[0]) and calls == [0]
    now[0] += 0.6
    assert memory.trim_soon(lambda: now[0]) and calls == [0, 0]
    assert memory._load_trim() is not None  # glibc here: the real one is found


def test_spool_rows_go_in_whole_and_in_order_across_insert_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """insert_job passes rows to SQLite as JSON arrays, a chunk per statement: every row
    lands once, in job order, with consecutive row ids from the one it reports first, and
    text and variables come back as they went in. The per-batch outcome writes too."""
    import sqlite3

    import msgspec

    from mta.queue import spool

    monkeypatch.setattr(spool, "INSERT_CHUNK", 3)
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.executescript(spool.SCHEMA)
    conn.execute("INSERT INTO recipients (job, idx, domain, rhash) VALUES (0, 0, 'x', 'h')")  # ids start at 2
    values = [msgspec.json.encode({"name": f"n{i}", "note": 'quote " back\\slash \u00e9 \u2028 \x01'})
              for i in range(8)]
    rows = [(i * 2, f"\u00fc{i}@d{i % 3}.test", f"d{i % 3}.test", msgspec.Raw(values[i]), f"{i:032x}")
            for i in range(8)]
    status, job_row, first, _, _ = spool.insert_job(conn, "a", "j", "c", "mlgnserv.com", b"d", b"t", b"{}", 1.0,
                                                    iter(rows), (1.0, "accepted", "a", b'{"n":1}'))
    assert status == "new" and first == 2
    got = conn.execute("SELECT id, job, idx, email, domain, vars, rhash FROM recipients WHERE id >= 2 "
                       "ORDER BY id").fetchall()
    assert [g[0] for g in got] == list(range(2, 10))
    assert [(g[2], g[3], g[4], g[6]) for g in got] == [(r[0], r[1], r[2], r[4]) for r in rows]
    assert all(g[1] == job_row and isinstance(g[5], bytes) for g in got)
    assert [msgspec.json.decode(g[5]) for g in got] == [msgspec.json.decode(v) for v in values]
    spool.set_final(conn, [(2, 3), (3, 5)])
    spool.append_events(conn, [(2.5, "delivered", None, b'{"recipient":"\\u00fc1@d1.test","code":"250 ok"}')])
    states = dict(conn.execute("SELECT id, state FROM recipients WHERE email IS NULL AND id >= 2").fetchall())
    assert states == {3: 2, 5: 3}
    event = conn.execute("SELECT time, type, account, body FROM events ORDER BY cursor DESC LIMIT 1").fetchone()
    assert event[:3] == (2.5, "delivered", None) and isinstance(event[3], bytes)
    assert msgspec.json.decode(event[3]) == {"recipient": "\u00fc1@d1.test", "code": "250 ok"}
