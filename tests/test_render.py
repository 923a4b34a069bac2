"""Rendering: a correct MIME message per recipient, with the SPEC §5 headers."""

from __future__ import annotations

import email
import email.policy
import re

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from mta.config import SendingDomain
from mta.delivery.render import CompiledJob
from mta.tokens import BOUNCE, TokenSigner
from mta.types import Content, JobInfo, RecipientRow

SD = SendingDomain("mlgnserv.com", "mta1.mlgnserv.com", (), "bounces.mlgnserv.com")
SIGNER = TokenSigner(b"s" * 32)
JOB = JobInfo(7, "acme", "job-7", "nov", "mlgnserv.com", 1700000000.0)


def compiled(**content: object) -> CompiledJob:
    return CompiledJob(JOB, msgspec.json.encode(Content(**content)), SD, SIGNER, "unsub")  # type: ignore[arg-type]


def row(vars_: dict[str, str], email_addr: str = "ann@x.test") -> RecipientRow:
    return RecipientRow(42, JOB, 3, email_addr, "x.test", vars_, 0)


def parse(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def test_multipart_alternative_with_all_headers() -> None:
    job = compiled(from_="Acme <news@acme.example>", subject="Hi {{name}}", text="Hello {{name}} ünïcode",
                   html="<p>Hello {{name}}</p>", list_unsubscribe_url="https://a.example/u/{{t}}",
                   headers={"X-Tag": "t-{{name}}"})
    out = job.render(row({"name": "Ann", "t": "T1"}))
    msg = parse(out.data)
    assert msg["Subject"] == "Hi Ann" and msg["To"] == "ann@x.test" and msg["X-Tag"] == "t-Ann"
    assert msg.get_content_type() == "multipart/alternative"
    assert msg.get_body(("plain",)).get_content().strip() == "Hello Ann ünïcode"  # type: ignore[union-attr]
    assert "Hello Ann" in msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert msg["Feedback-ID"] == "nov:acme:mlgnserv.com:mta"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    lu = " ".join(str(msg["List-Unsubscribe"]).split())
    assert "<https://a.example/u/T1>" in lu and "@bounces.mlgnserv.com?subject=unsubscribe>" in lu
    assert msg["Message-ID"] and msg["Date"]
    assert out.mail_from.startswith("b-") and out.mail_from.endswith("@bounces.mlgnserv.com")
    ref = SIGNER.verify(out.mail_from[2:].split("@")[0])
    assert ref is not None and (ref.purpose, ref.job, ref.recipient) == (BOUNCE, 7, 42)
    assert all(len(line) <= 998 for line in out.data.split(b"\r\n"))
    assert b"\n" not in out.data.replace(b"\r\n", b"")


def test_without_https_url_no_one_click_header() -> None:
    msg = parse(compiled(from_="a@a.example", subject="s", text="t").render(row({})).data)
    assert msg["List-Unsubscribe-Post"] is None and "mailto:" in str(msg["List-Unsubscribe"])
    assert msg.get_content_type() == "text/plain"


def test_non_ascii_subject_is_encoded() -> None:
    out = compiled(from_="Ünï <a@a.example>", subject="Grüße {{name}}", text="x").render(row({"name": "Jörg"}))
    assert out.data.isascii()
    assert parse(out.data)["Subject"] == "Grüße Jörg"


def test_raw_job_rendered_per_recipient() -> None:
    raw = "From: R <r@a.example>\nTo: {{name}} <{{to}}>\nSubject: Raw {{name}}\n\nDear {{name}}.\n"
    msg = parse(compiled(raw=raw).render(row({"name": "Bo", "to": "ann@x.test"})).data)
    assert msg["Subject"] == "Raw Bo" and "ann@x.test" in msg["To"]
    assert msg["Message-ID"] and msg["Date"] and msg["Feedback-ID"]
    assert msg.get_content().strip() == "Dear Bo."


@given(st.dictionaries(st.sampled_from(["name", "t"]), st.text(max_size=40), min_size=2, max_size=2))
def test_rendering_is_deterministic_and_lines_end_in_crlf(values: dict[str, str]) -> None:
    values = {k: v.replace("\r", "").replace("\n", "").replace("\x00", "") for k, v in values.items()}
    job = compiled(from_="a@a.example", subject="S {{name}}", text="T {{name}} {{t}}", html="<b>{{t}}</b>")
    a, b = job.render(row(values)), job.render(row(values))

    def undated(data: bytes) -> bytes:  # the Date header may tick between the two renders
        return re.sub(rb"(?m)^Date: [^\r]*\r\n", b"", data)

    assert undated(a.data) == undated(b.data) and a.mail_from == b.mail_from
    assert b"\n" not in a.data.replace(b"\r\n", b"") and b"\r" not in a.data.replace(b"\r\n", b"")
    header = a.data.split(b"\r\n\r\n", 1)[0]
    for line in header.split(b"\r\n"):
        assert line[:1] in (b" ", b"\t") or b":" in line  # every header line is a field or a fold


def _part_cte(data: bytes) -> str:
    return str(parse(data)["Content-Transfer-Encoding"])


def test_ascii_text_goes_7bit_with_crlf_and_anything_else_quoted_printable() -> None:
    job = compiled(from_="a@a.example", subject="s", text="Hi {{name}},\nline two\r\nline three\n")
    plain = job.render(row({"name": "Ann"})).data
    assert _part_cte(plain) == "7bit"
    assert plain.endswith(b"\r\n\r\nHi Ann,\r\nline two\r\nline three\r\n")
    # each of these makes 7bit wrong: non-ASCII, a lone CR, a line over 998 characters
    for value in ("Jörg", "a\rb", "x" * 1000):
        out = job.render(row({"name": value})).data
        assert _part_cte(out) == "quoted-printable", value
        assert all(len(line) <= 998 for line in out.split(b"\r\n"))
        body = parse(out).get_content().replace("\r\n", "\n").replace("\r", "\n")
        assert body.startswith("Hi " + value.replace("\r", "\n") + ",")
    long_literal = compiled(from_="a@a.example", subject="s", text="y" * 999 + " {{name}}")
    assert _part_cte(long_literal.render(row({"name": "A"})).data) == "quoted-printable"
