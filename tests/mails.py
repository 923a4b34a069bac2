"""Mail the outside world sends back, for the project's tests: DSNs and ARF reports."""

from __future__ import annotations


def report(report_type: str, machine_type: str, fields: str, *, sender: str, to: str, subject: str,
           human: str, attached: bytes = b"") -> bytes:
    """A multipart/report mail: a human part, the machine-readable part, the original."""
    head = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: multipart/report; report-type={report_type}; boundary=B\r\n\r\n"
            f"--B\r\nContent-Type: text/plain\r\n\r\n{human}\r\n"
            f"--B\r\nContent-Type: {machine_type}\r\n\r\n{fields}\r\n")
    tail = b"--B\r\nContent-Type: message/rfc822\r\n\r\n" + attached + b"\r\n" if attached else b""
    return head.encode() + tail + b"--B--\r\n"


def dsn(to: str, rcpt: str, status: str = "5.1.1", diag: str = "550 5.1.1 User unknown") -> bytes:
    fields = (f"Reporting-MTA: dns; mx.d.test\r\n\r\nFinal-Recipient: rfc822; {rcpt}\r\nAction: failed\r\n"
              f"Status: {status}\r\nDiagnostic-Code: smtp; {diag}\r\n")
    return report("delivery-status", "message/delivery-status", fields, sender="MAILER-DAEMON@mx.d.test",
                  to=to, subject="Undelivered Mail Returned to Sender", human="Your message could not be delivered.")


def arf(original: bytes = b"", *, rcpt_to: str | None = None, feedback_type: str = "abuse") -> bytes:
    fields = f"Feedback-Type: {feedback_type}\r\nVersion: 1\r\nUser-Agent: test/1\r\n"
    if rcpt_to:
        fields += f"Original-Rcpt-To: {rcpt_to}\r\n"
    return report("feedback-report", "message/feedback-report", fields, sender="fbl@isp.test",
                  to="fbl@mlgnserv.com", subject="complaint", human="This is an abuse report.", attached=original)
