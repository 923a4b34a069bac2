"""DKIM signing speed: messages/s on one core, per algorithm, against dkimpy's own signer.

    .venv/bin/python -m bench.dkim_sign [--seconds 3]

Signs the same ~5 KB rendered message repeatedly, single-threaded. Our signer uses dkimpy's
canonicalisation with the key operation in `cryptography` (OpenSSL); the baseline is
`dkim.sign()` from dkimpy with the same key, measured in the same run.
"""

from __future__ import annotations

import argparse
import base64
import time
from collections.abc import Callable

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mta.config import DkimKey
from mta.delivery.dkim import DkimSigner, sign

MESSAGE = (b"From: Bench <news@mlgnserv.com>\r\nTo: <ann@example.test>\r\nSubject: Hello Ann\r\n"
           b"Date: Sun, 22 Nov 2026 10:00:00 GMT\r\nMessage-ID: <1.2.abc@mlgnserv.com>\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           + b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n" * 62)


def rate(fn: Callable[[], object], seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    rsa_pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    ed_seed = base64.b64encode(ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                    serialization.NoEncryption()))
    ours_rsa = [DkimSigner("mlgnserv.com", DkimKey("s1", "-"), rsa_key)]
    ours_ed = [DkimSigner("mlgnserv.com", DkimKey("e1", "-", "ed25519-sha256"), ed_key)]
    headers = [b"from", b"to", b"subject", b"date", b"message-id"]
    results = {
        "rsa-sha256 mta": rate(lambda: sign(ours_rsa, MESSAGE), args.seconds),
        "rsa-sha256 dkimpy": rate(lambda: dkim.sign(MESSAGE, b"s1", b"mlgnserv.com", rsa_pem,
                                                    include_headers=headers), args.seconds),
        "ed25519-sha256 mta": rate(lambda: sign(ours_ed, MESSAGE), args.seconds),
        "ed25519-sha256 dkimpy": rate(lambda: dkim.sign(MESSAGE, b"e1", b"mlgnserv.com", ed_seed,
                                                        signature_algorithm=b"ed25519-sha256",
                                                        include_headers=headers), args.seconds),
    }
    for name, value in results.items():
        print(f"{name:24s} {value:10,.0f} messages/s (one core)")
    print(f"ratio rsa: mta/dkimpy = {results['rsa-sha256 mta'] / results['rsa-sha256 dkimpy']:.1f}x; "
          f"ed25519: mta/dkimpy = {results['ed25519-sha256 mta'] / results['ed25519-sha256 dkimpy']:.1f}x")


if __name__ == "__main__":
    main()
