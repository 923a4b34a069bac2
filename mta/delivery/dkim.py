"""DKIM signing at send time (RFC 6376; ed25519-sha256 per RFC 8463).

The canonicalisation rules come from dkimpy (relaxed/relaxed, header selection, the
b= handling); the key operation goes through `cryptography` (OpenSSL), which is ~25x
faster than dkimpy's pure-Python RSA. Keys are loaded once at start-up: a missing or
unreadable key is a config error, never a delivery failure.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Mapping

import dkim
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import Relaxed

from ..config import ConfigError, DkimKey, SendingDomain

# SPEC §5, in this order; those present in a message are signed. "from" twice: the second
# signs the absence of another From, so one cannot be prepended (over-signing).
SIGNED_HEADERS = (
    "from", "to", "subject", "date", "message-id", "list-unsubscribe", "list-unsubscribe-post", "feedback-id",
    "reply-to", "cc", "mime-version", "content-type", "content-transfer-encoding",
)
_SHA256 = Prehashed(hashes.SHA256())


class DkimSigner:
    def __init__(self, domain: str, key: DkimKey, private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        self.domain = domain
        self.selector = key.selector
        self.algorithm = key.algorithm
        self._private = private

    def __repr__(self) -> str:  # never show the key
        return f"DkimSigner({self.domain}, s={self.selector}, a={self.algorithm})"

    def signature_header(self, message: bytes, now: int | None = None) -> bytes:
        """The `DKIM-Signature: ...` field (folded, CRLF-terminated) for a CRLF message."""
        headers, body = dkim.rfc822_parse(message)
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        present = {name.lower() for name, _ in headers}
        names = [h for h in SIGNED_HEADERS if h.encode() in present] + ["from"]
        # Folded where RFC 6376 §3.2 allows whitespace: between tags, around the colons of
        # h=, and anywhere inside base64 values. The signature covers the value as folded.
        value = (f" v=1; a={self.algorithm}; c=relaxed/relaxed; d={self.domain}; s={self.selector};\r\n"
                 f" t={int(now if now is not None else time.time())};\r\n"
                 f" h={_fold_names(names)};\r\n bh={body_hash.decode()};\r\n b=").encode()
        hasher = hashlib.sha256()
        canonical = Relaxed.canonicalize_headers(headers)
        dkim.hash_headers(hasher, Relaxed, canonical, [n.encode() for n in names],
                          (b"DKIM-Signature", value), None)
        digest = hasher.digest()
        if isinstance(self._private, rsa.RSAPrivateKey):
            signature = self._private.sign(digest, padding.PKCS1v15(), _SHA256)
        else:
            signature = self._private.sign(digest)  # RFC 8463: Ed25519 over the SHA-256 hash
        return b"DKIM-Signature:" + value + _fold_base64(base64.b64encode(signature)) + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """Relaxed body canonicalisation (RFC 6376 §3.4.4).

    Fast path: a body with no tab, no run of spaces, no space before a line end and only
    CRLF line ends has nothing to compress, so only its trailing empty lines go; these
    checks run at C speed. Anything else takes dkimpy's regex implementation.
    """
    if (b"\t" not in body and b"  " not in body and b" \r\n" not in body
            and body.count(b"\r") == body.count(b"\n") == body.count(b"\r\n") and not body.endswith(b" ")):
        stripped = body.rstrip(b"\r\n")
        return stripped + b"\r\n" if stripped else b""
    result: bytes = Relaxed.canonicalize_body(body)
    return result


def _fold_names(names: list[str]) -> str:
    lines, line = [], ""
    for name in names:
        piece = name if not line else ":" + name
        if line and len(line) + len(piece) > 70:
            lines.append(line)
            line = ":" + name
        else:
            line += piece
    lines.append(line)
    return "\r\n ".join(lines)


def _fold_base64(data: bytes, width: int = 72) -> bytes:
    return b"\r\n ".join(data[i:i + width] for i in range(0, len(data), width))


def sign(signers: list[DkimSigner], message: bytes) -> bytes:
    """The message with one signature per key prepended (dual signing: RSA and Ed25519)."""
    if not signers:
        return message
    now = int(time.time())
    return b"".join(s.signature_header(message, now) for s in signers) + message


def _load_private(path: str, algorithm: str) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    with open(path, "rb") as f:
        data = f.read()
    if b"-----BEGIN" in data:
        key = serialization.load_pem_private_key(data, password=None)
    else:  # dkimpy's ed25519 form: the base64 of the 32-byte seed
        key = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(data.strip()))
    if algorithm == "rsa-sha256" and not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    if algorithm == "ed25519-sha256" and not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 1024:
        raise ValueError(f"RSA key of {key.key_size} bits; RFC 8301 requires at least 1024 (use 2048)")
    assert isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey))
    return key


def load_signers(domains: Mapping[str, SendingDomain]) -> dict[str, list[DkimSigner]]:
    """Every configured key, loaded now; raises ConfigError naming the key on any problem."""
    out: dict[str, list[DkimSigner]] = {}
    for name, sd in domains.items():
        for i, key in enumerate(sd.dkim):
            label = f"sending_domains.{name}.dkim" + (f"[{i}]" if len(sd.dkim) > 1 else "") + ".key_file"
            try:
                private = _load_private(key.key_file, key.algorithm)
            except OSError as exc:
                raise ConfigError(f"{label}: cannot read {key.key_file}: {exc.strerror or exc}") from None
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{label}: {key.key_file} is not a usable {key.algorithm} key: {exc}") from None
            out.setdefault(name, []).append(DkimSigner(name, key, private))
    return out
