"""DKIM: every signature is checked by an independent verifier (dkimpy's dkim.verify)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import dkim
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from mta.config import ConfigError, DkimKey, SendingDomain
from mta.delivery.dkim import DkimSigner, load_signers, relaxed_body, sign
from mta.delivery.render import CompiledJob
from mta.tokens import TokenSigner
from mta.types import Content, JobInfo, RecipientRow

from .conftest import job, wait_for
from .sinks import Sink

RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED = ed25519.Ed25519PrivateKey.generate()
TXT = {
    b"s1._domainkey.mlgnserv.com.": b"v=DKIM1; k=rsa; p=" + base64.b64encode(RSA.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)),
    b"e1._domainkey.mlgnserv.com.": b"v=DKIM1; k=ed25519; p=" + base64.b64encode(ED.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)),
}
SIGNERS = [DkimSigner("mlgnserv.com", DkimKey("s1", "-"), RSA),
           DkimSigner("mlgnserv.com", DkimKey("e1", "-", "ed25519-sha256"), ED)]


def dnsfunc(name: Any, timeout: float = 5) -> bytes | None:
    return TXT.get(name if isinstance(name, bytes) else name.encode())


def verify_all(message: bytes) -> list[bool]:
    d = dkim.DKIM(message)
    results = []
    for i in range(message.count(b"DKIM-Signature:")):
        try:
            results.append(bool(d.verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.ValidationError:  # dkimpy raises on a body-hash mismatch
            results.append(False)
    return results


AWKWARD = [
    b"From: A <a@mlgnserv.com>\r\nTo: b@x.test\r\nSubject: trailing   \r\n\r\nbody with trailing space   \r\n",
    b"From: a@mlgnserv.com\r\nSubject: folded\r\n  over\r\n\tthree lines\r\nTo: b@x.test\r\n\r\nx\r\n\r\n\r\n",
    b"From: a@mlgnserv.com\r\nTo: b@x.test\r\nSubject: long\r\n\r\n" + b"y" * 990 + b"\r\n",
    b"From: a@mlgnserv.com\r\nTo: b@x.test\r\nSubject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n" + "Grüße aus Köln\r\n".encode(),
    b"From: a@mlgnserv.com\r\nTo: b@x.test\r\nSubject: empty body\r\n\r\n",
]


@pytest.mark.parametrize("message", AWKWARD)
def test_dual_signatures_verify_on_awkward_messages(message: bytes) -> None:
    signed = sign(SIGNERS, message)
    assert verify_all(signed) == [True, True]
    assert b"a=rsa-sha256" in signed and b"a=ed25519-sha256" in signed


def test_tampering_breaks_the_signature() -> None:
    signed = sign(SIGNERS[:1], AWKWARD[0])
    assert verify_all(signed.replace(b"trailing", b"Trailing")) == [False]
    assert verify_all(b"From: evil@x.test\r\n" + signed) == [False]  # over-signed From


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x00"), max_size=300))
def test_rendered_messages_always_verify(body: str) -> None:
    sd = SendingDomain("mlgnserv.com", "mta1.mlgnserv.com", (), "bounces.mlgnserv.com")
    info = JobInfo(1, "acme", "j", "c", "mlgnserv.com", 0.0)
    content = Content(from_="A <a@mlgnserv.com>", subject="S {{name}}", text=body + "{{name}}", html="<p>x</p>")
    compiled = CompiledJob(info, msgspec.json.encode(content), sd, TokenSigner(b"k" * 32), "unsub",
                           footer=("Footer", "<p>Footer</p>"), dkim=SIGNERS)
    out = compiled.render(RecipientRow(1, info, 0, "ann@x.test", "x.test", {"name": "Ann"}, 0))
    assert verify_all(out.data) == [True, True]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b" ", b"  ", b"\t", b"\r\n", b"x y", b"\r\n\r\n", b" \r\n"]), max_size=30))
def test_fast_relaxed_body_matches_dkimpy(pieces: list[bytes]) -> None:
    body = b"".join(pieces)
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


def _write_key(path: Path) -> None:
    path.write_bytes(RSA.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))


def test_missing_or_bad_key_is_a_config_error(tmp_path: Path) -> None:
    sd = SendingDomain("mlgnserv.com", "e", (), "b", (DkimKey("s1", str(tmp_path / "nope.pem")),))
    with pytest.raises(ConfigError, match=r"sending_domains.mlgnserv.com.dkim.key_file: cannot read"):
        load_signers({"mlgnserv.com": sd})
    (tmp_path / "junk.pem").write_text("not a key")
    sd = SendingDomain("mlgnserv.com", "e", (), "b", (DkimKey("s1", str(tmp_path / "junk.pem")),))
    with pytest.raises(ConfigError, match="not a usable rsa-sha256 key"):
        load_signers({"mlgnserv.com": sd})
    _write_key(tmp_path / "ok.pem")
    sd = SendingDomain("mlgnserv.com", "e", (), "b", (DkimKey("s1", str(tmp_path / "ok.pem")),))
    assert repr(load_signers({"mlgnserv.com": sd})["mlgnserv.com"][0]) == "DkimSigner(mlgnserv.com, s=s1, a=rsa-sha256)"


async def test_delivered_mail_is_signed_and_carries_the_footer(daemon_factory: Any, sink: Sink,
                                                               tmp_path: Path) -> None:
    _write_key(tmp_path / "mlgnserv.pem")
    d = await daemon_factory(static={"d.test": [sink.addr]})
    await d.stop()
    # a DKIM key for mlgnserv.com and a footer, then start again on that config
    cfg = d.config_path.read_text().replace('bounce_domain = "bounces.mlgnserv.com"\n',
                      'bounce_domain = "bounces.mlgnserv.com"\n'
                      f'dkim = {{ selector = "s1", key_file = "{tmp_path}/mlgnserv.pem" }}\n', 1)
    d.config_path.write_text(cfg + '[footer]\ntext = "Sent by Mailigen"\nhtml = "<p>Sent by Mailigen</p>"\n')
    await d.start()
    await d.account("acme")
    await d.account("pro", no_footer=True)
    await d.submit(job("f1", ["ok1@d.test"], html="<html><body><p>Hi {{name}}</p></body></html>"))
    await d.submit(job("f2", ["ok2@d.test"], account="pro"))
    await wait_for(lambda: len(sink.delivered()) == 2, 20)
    by_rcpt = {m.rcpt: m.data for m in sink.messages()}
    for data in by_rcpt.values():
        assert verify_all(data) == [True]
        assert b"h=from:to:subject:date:message-id:list-unsubscribe:" in data.replace(b"\r\n ", b"")
    import email
    import email.policy

    msg = email.message_from_bytes(by_rcpt["ok1@d.test"], policy=email.policy.default)
    assert "Sent by Mailigen" in msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert html.index("<p>Sent by Mailigen</p>") < html.index("</body>")
    assert b"Sent by Mailigen" not in by_rcpt["ok2@d.test"]  # --no-footer (PRO package)
