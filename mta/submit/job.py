"""Submit jobs (SPEC §4): the wire model and the checks a job passes before it is spooled.

Pure functions over decoded data: no I/O, so every refusal is easy to test. The order of
checks is the order of the error codes a campaign system can act on: the job as a whole
first (malformed, header_injection, too_many_recipients, message_too_large), then each
recipient (invalid_address, missing_variable, header_injection through a variable).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import msgspec

from ..template import Text, has_header_breaker, split_raw
from ..types import Content, NewRecipient

VarValue = str | int | float | bool | None
A = TypeVar("A")
B = TypeVar("B")


class RecipientIn(msgspec.Struct, forbid_unknown_fields=False):
    """A recipient whose variables are all strings: the shape the checks and the spool use,
    and the one a line is decoded into first (no per-recipient conversion then)."""

    email: str
    vars: dict[str, str] = {}


class LooseRecipientIn(msgspec.Struct, forbid_unknown_fields=False):
    """A recipient with numbers, booleans or nulls among its variables (SPEC §4 allows them);
    they are turned into their text before the checks."""

    email: str
    vars: dict[str, VarValue] = {}


class _JobFields(Content, kw_only=True, forbid_unknown_fields=False):
    """A submit request: the content fields (from, subject, text, html, raw, headers,
    list_unsubscribe_url) plus who sends it; the recipients are in the subclasses."""

    job_id: str
    account: str
    sending_domain: str
    campaign: str = ""
    op: str = "submit"


class JobIn(_JobFields, kw_only=True, forbid_unknown_fields=False):
    recipients: list[RecipientIn]


class LooseJobIn(_JobFields, kw_only=True, forbid_unknown_fields=False):
    recipients: list[LooseRecipientIn]


class LargeJobIn(_JobFields, kw_only=True, forbid_unknown_fields=False):
    """A job whose recipients stay undecoded JSON until they are walked a chunk at a time:
    a million recipients are then a million small references into the request line, not a
    million structs with their dicts (issue 8: memory stays bounded)."""

    recipients: list[msgspec.Raw]


class Refused(Exception):
    """The whole job is refused with an error code (SPEC §4)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


AnyJob = JobIn | LooseJobIn | LargeJobIn
CHUNK = 10_000  # recipients decoded at once from a LargeJobIn
LARGE_LINE = 8 << 20  # request lines longer than this are decoded as a LargeJobIn
_decode_large = msgspec.json.Decoder(LargeJobIn).decode


def _text_first(text: Callable[[bytes], A], loose: Callable[[bytes], B]) -> Callable[[bytes], A | B]:
    """A decoder trying text variables first; data not of that shape is decoded again loosely,
    and the loose decoder's error (if any) is the one reported."""
    def decode(data: bytes) -> A | B:
        try:
            return text(data)
        except msgspec.ValidationError:
            return loose(data)
    return decode


_decode_job = _text_first(msgspec.json.Decoder(JobIn).decode, msgspec.json.Decoder(LooseJobIn).decode)
_decode_chunk = _text_first(msgspec.json.Decoder(list[RecipientIn]).decode,
                            msgspec.json.Decoder(list[LooseRecipientIn]).decode)
_CHUNK_PATH = re.compile(r"\$\[(\d+)\]")


def _whole_line_path(start: int, m: re.Match[str]) -> str:
    return f"$.recipients[{start + int(m.group(1))}]"


def decode_job(line: bytes) -> AnyJob:
    """A submit line as a job struct (raises msgspec.ValidationError / DecodeError)."""
    return _decode_large(line) if len(line) > LARGE_LINE else _decode_job(line)


def _as_decoded(job: AnyJob) -> Iterator[tuple[int, list[RecipientIn] | list[LooseRecipientIn]]]:
    """(index of the first, recipients as decoded) a chunk at a time, for any form of job."""
    if not isinstance(job, LargeJobIn):
        yield 0, job.recipients
        return
    for start in range(0, len(job.recipients), CHUNK):
        part = job.recipients[start:start + CHUNK]
        try:
            decoded = _decode_chunk(b"[" + b",".join(raw for raw in part) + b"]")
        except msgspec.ValidationError as exc:  # said as if the whole line had been decoded at once
            where = _CHUNK_PATH.sub(partial(_whole_line_path, start), str(exc))
            raise Refused("malformed_request", f"not a valid job: {where}") from None
        yield start, decoded


def chunks(job: AnyJob) -> Iterator[tuple[int, list[RecipientIn]]]:
    """(index of the first, recipients with text variables) a chunk at a time."""
    for start, part in _as_decoded(job):
        yield start, [_as_text(r) for r in part] if _is_loose(part) else part  # type: ignore[misc]


def _is_loose(part: list[RecipientIn] | list[LooseRecipientIn]) -> bool:
    return bool(part) and type(part[0]) is LooseRecipientIn


def _as_text(rcpt: LooseRecipientIn | RecipientIn) -> RecipientIn:
    return RecipientIn(rcpt.email, {k: ("" if v is None else str(v)) for k, v in rcpt.vars.items()})


@dataclass(slots=True)
class Prepared:
    """A validated job: what goes into the spool, and what the answer will say.

    `rows()` gives the spool rows (idx, email, ascii domain, vars as JSON, keyed hash of the
    address) in order. For a JobIn they are kept from the checks; for a LargeJobIn they are
    made again from the request line when the spool asks for them, so that no more than a
    chunk of them exists at a time.
    """

    job: AnyJob
    content: Content
    digest: bytes
    address_hash: Callable[[str], str]
    domains: list[str] = field(default_factory=list)   # of the accepted rows, in order
    rejected: list[dict[str, object]] = field(default_factory=list)
    kept: list[NewRecipient] | None = None

    @property
    def count(self) -> int:
        return len(self.domains)

    def rows(self) -> Iterator[NewRecipient]:
        if self.kept is not None:
            yield from self.kept
            return
        refused = {r["index"] for r in self.rejected}
        cache: dict[str, str | None] = {}
        for start, part in chunks(self.job):
            for idx, rcpt in enumerate(part, start):
                if idx not in refused:
                    parts = split_address(rcpt.email, cache)
                    assert parts is not None  # it passed the checks
                    yield _row(idx, parts, _encode(rcpt.vars), self.address_hash)


def _row(idx: int, parts: tuple[str, str], blob: bytes,
         address_hash: Callable[[str], str]) -> NewRecipient:
    """The spool row of a recipient that passed the checks."""
    email = f"{parts[0]}@{parts[1]}"
    return idx, email, parts[1], msgspec.Raw(blob), address_hash(email.lower())


# Headers the daemon writes itself; a job may not set them through `headers`.
RESERVED_HEADERS = frozenset({
    "from", "to", "subject", "date", "mime-version", "content-type", "content-transfer-encoding",
    "list-unsubscribe", "list-unsubscribe-post", "feedback-id", "dkim-signature", "return-path",
    "received", "sender",
})
_FIELD_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 §2.2: printable ASCII except colon
# local part (no specials, at most 64 octets: RFC 5321 §4.5.3.1.1) @ domain (checked apart)
_ADDRESS = re.compile(r"([^\s@<>()\[\],;:\"\\\x00-\x1f\x7f]{1,64})@([^@]*)")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_encode = msgspec.json.encode


def ascii_domain(domain: str) -> str | None:
    """The A-label form of a recipient domain (IDNA), or None when it is not a valid host name."""
    domain = domain.strip().rstrip(".").lower()
    if not domain or len(domain) > 253:
        return None
    try:
        ascii_form = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return None
    labels = ascii_form.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return None
    return ascii_form


def split_address(email: str, domains: dict[str, str | None] | None = None) -> tuple[str, str] | None:
    """(local part, ascii domain) of a plain address, or None if it is not one. `domains`
    caches ascii_domain() across a job: its 10,000 recipients share a few hundred domains."""
    m = _ADDRESS.fullmatch(email.strip())
    if m is None:
        return None
    local, domain = m.groups()
    if local[0] == "." or local[-1] == "." or ".." in local:
        return None
    if domains is None:
        ascii_form = ascii_domain(domain)
    elif (ascii_form := domains.get(domain, "")) == "":
        ascii_form = domains[domain] = ascii_domain(domain)
    if ascii_form is None:
        return None
    return local, ascii_form


def job_digest(job: AnyJob) -> bytes:
    """What makes two submissions "the same job" for idempotency: the content, key order aside.
    A LargeJobIn hashes the same bytes as the JobIn of the same line, a chunk at a time."""
    if not isinstance(job, LargeJobIn):
        return hashlib.sha256(_encode(job, order="sorted")).digest()
    head = _encode(msgspec.structs.replace(job, recipients=[]), order="sorted")
    before, marker, after = head.partition(b'"recipients":[')
    digest = hashlib.sha256(before + marker)
    for start, part in _as_decoded(job):
        if start:
            digest.update(b",")
        digest.update(_encode(part, order="sorted")[1:-1])
    digest.update(after)
    return digest.digest()


def content_of(job: AnyJob) -> Content:
    return Content(from_=job.from_, subject=job.subject, text=job.text, html=job.html, raw=job.raw,
                   headers=dict(job.headers), list_unsubscribe_url=job.list_unsubscribe_url)


def _check_fields(job: AnyJob) -> None:
    if not job.job_id.strip() or len(job.job_id) > 200:
        raise Refused("malformed_request", "job_id must be a non-empty string of at most 200 characters")
    if not job.account.strip():
        raise Refused("malformed_request", "account must be a non-empty string")
    values = {"from": job.from_, "subject": job.subject, "list_unsubscribe_url": job.list_unsubscribe_url,
              "campaign": job.campaign, "job_id": job.job_id, "account": job.account}
    for name, value in values.items():
        if value is not None and has_header_breaker(value):
            raise Refused("header_injection", f"{name} contains CR, LF or NUL")
    for name, value in job.headers.items():
        if has_header_breaker(name) or has_header_breaker(value):
            raise Refused("header_injection", f"header {name!r} contains CR, LF or NUL")
        if not _FIELD_NAME.match(name):
            raise Refused("malformed_request", f"header name {name!r} is not a valid field name")
        if name.lower() in RESERVED_HEADERS:
            raise Refused("malformed_request", f"header {name!r} is set by the daemon, not by a job")
    if job.raw is not None:
        if any(v is not None for v in (job.subject, job.text, job.html)):
            raise Refused("malformed_request", "a job carries either raw or subject/text/html, not both")
        if "\x00" in job.raw:
            raise Refused("header_injection", "raw contains NUL")
        head, _ = split_raw(job.raw)
        if not re.search(r"(?im)^from:", head):
            raise Refused("malformed_request", "raw message has no From header")
    else:
        if job.from_ is None:
            raise Refused("malformed_request", "from is required (or give a raw message)")
        if job.text is None and job.html is None:
            raise Refused("malformed_request", "text or html is required (or give a raw message)")
        if job.subject is None:
            raise Refused("malformed_request", "subject is required")
    if job.list_unsubscribe_url is not None and not job.list_unsubscribe_url.startswith("https://"):
        raise Refused("malformed_request", "list_unsubscribe_url must be an https:// URL (RFC 8058)")


def _qp_size(text: str) -> int:
    """Upper bound of the quoted-printable size of a UTF-8 text (3 bytes per escaped byte)."""
    raw = text.encode("utf-8", "surrogatepass")
    escaped = sum(1 for b in raw if b > 126 or b == 61)
    return len(raw) + 2 * escaped + len(raw) // 72 * 3


def prepare(job: AnyJob, *, max_recipients: int, max_message_size: int,
            address_hash: Callable[[str], str], digest: bytes | None = None,
            suppressed: Callable[[str, str], bool] | None = None) -> Prepared:
    """Validate a decoded job; raise Refused for the whole job, else list per-recipient rejections."""
    _check_fields(job)
    if len(job.recipients) > max_recipients:
        raise Refused("too_many_recipients",
                      f"{len(job.recipients)} recipients; at most {max_recipients} per job")
    content = content_of(job)
    header_texts = [Text(v) for v in (job.from_, job.subject, job.list_unsubscribe_url) if v]
    header_texts += [Text(v) for v in job.headers.values()]
    body_texts: list[Text] = []
    if job.raw is not None:
        head, body = split_raw(job.raw)
        header_texts.append(Text(head))
        body_texts.append(Text(body))
    else:
        body_texts += [Text(v) for v in (job.text, job.html) if v]
    header_names = frozenset().union(*(t.names for t in header_texts))
    all_names = header_names.union(*(t.names for t in body_texts))
    # Size: literal parts once, plus each variable's value as often as it occurs.
    occurrences: dict[str, int] = {}
    for t in header_texts + body_texts:
        for name, n in t.occurrences().items():
            occurrences[name] = occurrences.get(name, 0) + n
    base_size = 2048 + sum(_qp_size(p) for t in body_texts for p in t.parts[0::2]) \
        + sum(t.literal_size() for t in header_texts)
    if base_size > max_message_size:
        raise Refused("message_too_large",
                      f"the rendered message is at least {base_size} bytes; max_message_size is {max_message_size}")
    most = sum(occurrences.values())
    if digest is None:
        digest = job_digest(job)
    prepared = Prepared(job, content, digest, address_hash)
    keep = not isinstance(job, LargeJobIn)
    kept: list[NewRecipient] = []
    seen: set[str] = set()
    domains: dict[str, str | None] = {}
    in_headers = tuple(header_names)
    reject = prepared.rejected.append
    # the loop below runs once per recipient (10,000 per job): it is kept free of per-item
    # conversions and sets, since it bounds the acceptance rate (issue 7)
    for start, part in chunks(job):
        for idx, rcpt in enumerate(part, start):
            parts = split_address(rcpt.email, domains)
            if parts is None:
                reject({"index": idx, "email": rcpt.email, "code": "invalid_address"})
                continue
            values = rcpt.vars
            if not all_names <= values.keys():
                reject({"index": idx, "email": rcpt.email, "code": "missing_variable",
                        "message": "missing " + ", ".join(sorted(all_names.difference(values)))})
                continue
            if any(has_header_breaker(values[n]) for n in in_headers):
                reject({"index": idx, "email": rcpt.email, "code": "header_injection",
                        "message": "a variable used in a header contains CR, LF or NUL"})
                continue
            blob = _encode(values)
            # the JSON of the values is at least as long as their UTF-8 bytes: when even that
            # bound fits, the exact sum per placeholder is not needed (the common, cheap case)
            if base_size + 3 * most * len(blob) > max_message_size and base_size + sum(
                    3 * len(values[n].encode()) * k for n, k in occurrences.items()) > max_message_size:
                reject({"index": idx, "email": rcpt.email, "code": "message_too_large"})
                continue
            row = _row(idx, parts, blob, address_hash)
            rhash = row[4]  # of the lower-cased address: equal hashes are the same recipient
            if rhash in seen:
                reject({"index": idx, "email": rcpt.email, "code": "duplicate_recipient"})
                continue
            if suppressed is not None and suppressed(job.account, rhash):
                reject({"index": idx, "email": rcpt.email, "code": "suppressed"})
                continue
            seen.add(rhash)
            prepared.domains.append(parts[1])
            if keep:
                kept.append(row)
    if keep:
        prepared.kept = kept
    return prepared
