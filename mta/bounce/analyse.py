"""What a returned mail says: bounce results, a complaint, an auto-reply, or nothing.

`analyse(raw)` is what both the listener and `mta bounce classify` call. It never raises on
the content of a mail: anything unreadable yields fewer results, not an exception.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from email.message import Message
from typing import Any

from ..types import Classification, Reply
from . import dsn, mime, textual
from .rules import RULES, RuleSet


@dataclass(frozen=True, slots=True)
class Result:
    """One finding, in the shape `mta bounce classify` prints (SPEC §2)."""

    recipient: str | None
    kind: str                       # hard | soft | complaint | auto_reply | unsubscribe | none
    reason: str | None = None
    status: str | None = None
    replycode: int | None = None
    feedback_type: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


_BOUNCE_FROM = re.compile(r"mailer-daemon|post_?master|mail delivery|mail-daemon|mail administrator|"
                          r"delivery (subsystem|system|status)|mailer|bounce|returned mail", re.I)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|delivery (status|failure|failed|notification|problem|report|has failed)|returned mail|"
    r"failure notice|mail delivery|undelivered|not delivered|delivery error|could not (be )?deliver|"
    r"non[- ]?remis|nondeliver|rejected|warning: message|delayed mail|message status|error sending|"
    r"mail could not|permanent error|bounce|unzustellbar|zustellung|échec|entrega|sending failed",
    re.I)
_AUTO_SUBJECT = re.compile(r"^\s*(auto(matic)?[ -]?(reply|response|antwort|réponse)|auto:|out of (the )?office|"
                           r"vacation|abwesenheit|absence|away from|on leave|réponse automatique|"
                           r"risposta automatica|respuesta automática|autosvar|automaattinen)", re.I)
_ARF_TEXT = re.compile(r"^feedback-type:\s*([\w-]+)", re.I | re.M)
_BOUNCE_BODY = re.compile(r"could not be delivered|delivery to the following|permanent(ly)? fatal|"
                          r"following (address|recipient)|was not delivered|not be delivered", re.I)
_STAGE_COMMAND = {"connect": "CONN", "mail": "MAIL", "rcpt": "RCPT", "data": "DATA"}


def _addr_list(value: str) -> list[str]:
    return [m.group(0).lower() for m in textual.ADDRESS.finditer(value)]


def _first_addr(value: str) -> str | None:
    found = _addr_list(value)
    return found[0] if found else None


# --- ARF (RFC 5965) ----------------------------------------------------------------------

def _report_fields(part: Message) -> dict[str, list[str]]:
    """Fields of a message/feedback-report part; repeated fields (Original-Rcpt-To) kept."""
    fields: dict[str, list[str]] = {}
    for block in dsn.field_blocks(part):
        for name, value in block:
            fields.setdefault(name, []).append(value)
    return fields


def _arf(msg: Message) -> list[Result] | None:
    fields: dict[str, list[str]] | None = None
    for part in mime.walk(msg):
        if part.get_content_type() == "message/feedback-report":
            fields = _report_fields(part)
            break
    original = mime.attached_message(msg)
    if fields is None:
        report_type = str(msg.get_param("report-type") or "").lower()
        body = mime.body_text(msg)
        m = _ARF_TEXT.search(body)
        if report_type == "feedback-report":
            fields = {}
        elif m and re.search(r"^(user-agent|version|original-rcpt-to|source-ip|arrival-date)\s*:",
                             body, re.I | re.M):
            # non-standard reports with the ARF fields inline in the body
            fields = {"feedback-type": [m.group(1)],
                      "original-rcpt-to": re.findall(r"^original-rcpt-to:\s*(.+)$", body, re.I | re.M)}
        elif original is not None and original.get("X-HmXmrOriginalRecipient"):
            # Microsoft's JMRP/Hotmail reports: the original with the complainer in a header
            fields = {"original-rcpt-to": [str(original.get("X-HmXmrOriginalRecipient"))]}
        elif mime.header(msg, "X-Apple-Unsubscribe").lower() == "true":
            # Apple Mail's one-click unsubscribe by mail: an opt-out report
            fields = {"feedback-type": ["opt-out"]}
        else:
            return None
    feedback_type = (fields.get("feedback-type") or ["abuse"])[0].split()[0].lower().strip(";") or "abuse"
    recipients: list[str | None] = []
    for value in fields.get("original-rcpt-to", []):
        recipients.extend(a for a in _addr_list(value) if a not in recipients)
    if not recipients and original is not None:
        recipients = list(_addr_list(mime.header(original, "To"))[:1])
    return [Result(r, "complaint", "feedback", feedback_type=feedback_type) for r in recipients or [None]]


# --- Amazon SES notifications (JSON in the body) ---------------------------------------

def _ses(body: str, rules: RuleSet) -> list[Result] | None:
    start = body.find('{"notificationType"')
    if start < 0:
        start = body.find('{"eventType"')
    if start < 0:
        return None
    try:
        doc, _ = json.JSONDecoder().raw_decode(body[start:])
    except ValueError:
        doc = _ses_salvage(body[start:])
    if not isinstance(doc, dict):
        return None
    kind = str(doc.get("notificationType") or doc.get("eventType") or "").lower()
    if kind == "complaint":
        c = doc.get("complaint") or {}
        ftype = str(c.get("complaintFeedbackType") or "abuse").lower()
        return [Result(str(r.get("emailAddress", "")).lower() or None, "complaint", "feedback", feedback_type=ftype)
                for r in c.get("complainedRecipients", []) if isinstance(r, dict)]
    if kind != "bounce":
        return [] if kind == "delivery" else None
    b = doc.get("bounce") or {}
    out = []
    for r in b.get("bouncedRecipients", []):
        if not isinstance(r, dict):
            continue
        diag = str(r.get("diagnosticCode") or "")
        status = dsn.status_in(str(r.get("status") or "")) or dsn.status_in(diag)
        rep = dsn.Report(str(r.get("emailAddress", "")).lower() or None, diag, status,
                         str(r.get("action") or "failed").lower(), dsn.reply_in(diag[:12]))
        sub = f"{b.get('bounceType', '')} {b.get('bounceSubType', '')}"
        out.append(_classify(rep, sub, rules))
    return out


def _ses_salvage(text: str) -> dict[str, Any]:
    """The recipients of a notification whose JSON was mangled in transit (folded lines)."""
    kind = re.search(r'"notificationType"\s*:\s*"(\w+)"', text)
    recipients = []
    for obj in re.finditer(r'\{[^{}]*"emailAddress"\s*:\s*"[^"]+"[^{}]*\}', text):
        fields = dict(re.findall(r'"(\w+)"\s*:\s*"([^"]*)"', obj.group(0)))
        recipients.append(fields)
    key = "complainedRecipients" if kind and kind.group(1).lower() == "complaint" else "bouncedRecipients"
    section = "complaint" if key == "complainedRecipients" else "bounce"
    return {"notificationType": kind.group(1) if kind else "", section: {key: recipients}}


# --- bounces -------------------------------------------------------------------------------

def _classify(rep: dsn.Report, context: str, rules: RuleSet) -> Result:
    command = rep.command or textual.command_in(rep.diagnostic)
    status = rep.status if rep.status and rep.status not in ("5.0.0", "4.0.0") else None
    # a relaying MTA's summary code comes first, the remote server's own (quoted) code last
    status = status or dsn.last_status_in(rep.diagnostic)
    domain = (rep.recipient or "").rpartition("@")[2]
    if domain in rules.list_domains and not rep.replycode and not rep.status:
        reason: str | None = rules.list_reason
    else:
        reason = rules.reason(rep.diagnostic, status, command, context)
    if reason is None:
        reason = rules.by_status(rep.status)
    if rep.diagnostic_type.startswith("x-unix") and reason not in ("mailboxfull", "systemfull"):
        # the words of a local delivery program (procmail, a pipe): the mailer failed
        reason = "mailererror"
    if reason in ("networkerror", None) and (
            rep.action == "delayed" or (rep.action == "failed" and (rep.status or "").startswith("4"))):
        # a temporary network failure that the reporting MTA gave up on (or still retries
        # after hours): what failed is the time
        reason = "expired"
    status_temporary = (rep.status or "").startswith("4")
    if status_temporary and rep.action == "failed" and not rep.diagnostic.strip():
        # a temporary status the reporting MTA gave up on, with nothing more said: it expired
        reason = "expired"
    if reason == "hostunknown" and status_temporary:
        # a DNS failure the reporting MTA calls temporary says nothing final about the domain
        reason = "networkerror"
    if reason is None:
        reason = "expired" if rep.action in ("delayed",) else "onhold"
    replycode = rep.replycode or textual.replycode_in(rep.diagnostic)
    # what the server said (its reply or the code in it), or a temporary Status the
    # reporting MTA gave up on; not a delay warning's Status (the MTA is still trying)
    temporary = (str(replycode or "").startswith("4") or (dsn.status_in(rep.diagnostic) or "").startswith("4")
                 or (rep.action == "failed" and status_temporary))
    return Result(rep.recipient, rules.kind(reason, temporary), reason,
                  rep.status or dsn.status_in(rep.diagnostic), replycode)


_LIST_ROLE = re.compile(r"^[^@]*(-admin|-owner|-request|-bounces?)@|^owner-", re.I)


def _list_notice(msg: Message) -> bool:
    """A mailing-list manager's own notice (not a member, loop alert): the list refused the post."""
    if msg.get("X-MLServer") or msg.get("X-ML-Name"):
        return True
    listed = msg.get("List-Id") or msg.get("Mailing-List") or msg.get("List-Post")
    return bool(listed) and bool(_LIST_ROLE.search(_first_addr(mime.header(msg, "From")) or ""))


def _is_bounce(msg: Message, body: str, strict: bool) -> bool:
    """strict: by the headers alone; else also by what the body says."""
    if msg.get_content_type() == "multipart/report":
        return True
    if msg.get("X-Failed-Recipients") or _list_notice(msg):
        return True
    sender = mime.header(msg, "From") + " " + mime.header(msg, "Return-Path")
    subject = mime.header(msg, "Subject")
    if _BOUNCE_FROM.search(sender) or _BOUNCE_SUBJECT.search(subject):
        return True
    return not strict and bool(_BOUNCE_BODY.search(body[:4000]))


def _bounce(msg: Message, body: str, rules: RuleSet) -> list[Result]:
    section = textual.error_section(body)
    context = mime.squeeze(section)
    reps = dsn.reports(msg)
    exclude = set(_addr_list(mime.header(msg, "To")) + _addr_list(mime.header(msg, "From")))
    if reps:
        # the prose often has what the DSN fields left out: the remote server's words, or
        # the SMTP command they answered (a session transcript)
        prose = {t.recipient: t for t in
                 textual.reports(body, exclude, [r.recipient for r in reps if r.recipient])}
        out = []
        for rep in reps:
            trep = prose.get(rep.recipient)
            if trep is not None:  # (a DSN field block never names the command itself)
                if not rep.diagnostic and (trep.replycode or trep.status):
                    rep.diagnostic = trep.diagnostic
                # a transcript's own command outranks one the diagnostic's words imply
                explicit = textual.explicit_command_in(trep.diagnostic)
                if explicit and not textual.explicit_command_in(rep.diagnostic):
                    rep.command = explicit
                elif not textual.command_in(rep.diagnostic):
                    rep.command = trep.command
            out.append(_classify(rep, context, rules))
        return out
    failed = _addr_list(mime.header(msg, "X-Failed-Recipients"))
    treps = textual.reports(body, exclude, failed)
    if not treps:
        original = mime.attached_message(msg)
        to = _first_addr(mime.header(original, "To")) if original is not None else None
        treps = [dsn.Report(to, section.strip(), dsn.status_in(section), None,
                            textual.replycode_in(section), textual.command_in(section))]
    return [_classify(rep, context, rules) for rep in treps]


def _auto_reply(msg: Message) -> bool:
    auto = mime.header(msg, "Auto-Submitted").lower()
    if auto.startswith("auto-replied"):
        return True
    if msg.get("X-Autoreply") or msg.get("X-Autorespond") or msg.get("X-Autoresponder"):
        return True
    if mime.header(msg, "Precedence").lower() == "auto_reply":
        return True
    return bool(_AUTO_SUBJECT.search(mime.header(msg, "Subject")))


def analyse(raw: bytes, *, rules: RuleSet = RULES, unsubscribe: bool = False) -> list[Result]:
    """Every finding in one mail. `unsubscribe`: it came to an unsubscribe address."""
    try:
        msg = mime.parse(raw)
    except Exception:
        return []
    if unsubscribe:
        sender = _first_addr(mime.header(msg, "Reply-To")) or _first_addr(mime.header(msg, "From"))
        return [Result(sender, "unsubscribe", "unsubscribe")]
    arf = _arf(msg)
    if arf is not None:
        return arf
    body = mime.body_text(msg)
    ses = _ses(body, rules)
    if ses is not None:
        return ses
    if _is_bounce(msg, body, strict=True):
        return _bounce(msg, body, rules)
    if _auto_reply(msg):
        return [Result(_first_addr(mime.header(msg, "From")), "auto_reply", "vacation")]
    if not _is_bounce(msg, body, strict=False):
        return []
    return _bounce(msg, body, rules)


def classify_reply(reply: Reply, rules: RuleSet = RULES) -> Classification:
    """An in-session SMTP reply through the same rules (a 550 at RCPT is a bounce too)."""
    if reply.code == 0:
        reason = rules.by_text(reply.text) or "networkerror"
        return Classification("soft", reason)
    status = reply.enhanced or None
    command = _STAGE_COMMAND.get(reply.stage)
    # no reporting MTA gave up here: the reply is all there is (no action)
    rep = dsn.Report(None, reply.line(), status, None, reply.code, command)
    result = _classify(rep, "", rules)
    return Classification(result.kind, result.reason or "undefined")
