"""The notices an account's owner gets on a pause or a warning (SPEC §1).

Pure text from the decision's figures: campaign, measured rate, threshold and what to do
next. A notice is built only from counts, never from the addresses behind them, so it
cannot list the people who complained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RULE_NAMES = {
    "hard_bounce_rate": "hard-bounce rate",
    "abuse_complaint_rate": "abuse-complaint rate",
    "unsubscribe_rate": "unsubscribe rate",
    "blocklisted": "blocklisting",
}
COUNT_NAMES = {
    "hard_bounce_rate": ("hard bounces", "messages attempted"),
    "abuse_complaint_rate": ("abuse complaints", "messages delivered"),
    "unsubscribe_rate": ("unsubscribes", "messages delivered"),
}
NEXT_STEPS = {
    "hard_bounce_rate": [
        "The addresses that bounced are on your suppression list already and will not be mailed again.",
        "Find out where the list came from: a high hard-bounce rate usually means an old, rented or "
        "bought list. Verify the rest of it before you send again.",
    ],
    "abuse_complaint_rate": [
        "Recipients reported this campaign as spam. Their addresses are suppressed; for their "
        "privacy we do not share them.",
        "Mail only people who asked for your mail (confirmed opt-in), make the sender name and the "
        "unsubscribe link easy to recognise, and check how often you send.",
    ],
    "unsubscribe_rate": [
        "The addresses that unsubscribed are suppressed and will not be mailed again.",
        "Check that the list is opted in and that the content is what subscribers signed up for; "
        "a sudden rise in unsubscribes often follows a change of topic or frequency.",
    ],
    "blocklisted": [
        "Receivers refused your mail naming a blocklist. Do not resend to the refused addresses.",
        "Check the list for spam traps and purchased addresses; we handle the delisting with the "
        "blocklist operator once the cause is fixed.",
    ],
}
REPLY = ("When that is done, reply to this message to ask for a review: our compliance team "
         "resumes the account after checking.")


@dataclass(frozen=True, slots=True)
class Notice:
    kind: str      # pause | warning
    subject: str
    text: str


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f} %"


def _measured(detail: dict[str, Any]) -> str:
    rule = detail.get("rule", "")
    if rule == "blocklisted":
        return f"{detail.get('count')} replies naming a blocklist (limit {detail.get('threshold')})"
    what, of = COUNT_NAMES.get(rule, ("events", "messages"))
    return (f"{RULE_NAMES.get(rule, rule)} {percent(detail.get('rate'))} "
            f"({detail.get('count')} {what} of {detail.get('sample')} {of})")


def pause_notice(account_id: str, reason: str, detail: dict[str, Any] | None, signature: str) -> Notice:
    detail = detail or {}
    rule = str(detail.get("rule") or reason)
    campaign = detail.get("campaign")
    lines = ["Hello,", "", f"We have paused sending for your account \"{account_id}\".", ""]
    if rule in RULE_NAMES:
        threshold = detail.get("threshold")
        lines += ["What happened", f"  Campaign:  {campaign}", f"  Measured:  {_measured(detail)}"]
        if rule != "blocklisted":
            lines.append(f"  Threshold: {percent(threshold if isinstance(threshold, float) else None)} "
                         "(the limit in our terms of service for your account)")
        subject = f"Sending paused for account {account_id}: {RULE_NAMES[rule]} in campaign {campaign}"
        steps = NEXT_STEPS[rule]
    else:
        lines += ["What happened", f"  Our compliance team paused the account: {reason}"]
        subject = f"Sending paused for account {account_id}"
        steps = []
    lines += ["", "Your mail is safe",
              "  Messages already queued are kept, not deleted, and go out once the account is resumed.",
              "  New campaigns are refused until then.", "", "What to do next"]
    lines += [f"  - {s}" for s in steps] + [f"  - {REPLY}", "", "-- ", signature, ""]
    return Notice("pause", subject, "\n".join(lines))


def warning_notice(account_id: str, detail: dict[str, Any], pause_at: float, signature: str) -> Notice:
    campaign = detail.get("campaign")
    lines = ["Hello,", "",
             f"Campaign \"{campaign}\" of your account \"{account_id}\" is close to the limits of our terms "
             "of service.", "",
             f"  Measured:  {_measured(detail)}",
             f"  Warning at {percent(detail.get('threshold'))}; sending is paused at {percent(pause_at)}.", "",
             "What to do next", *[f"  - {s}" for s in NEXT_STEPS["hard_bounce_rate"]],
             "  - Nothing has been stopped yet: your mail keeps going out.", "", "-- ", signature, ""]
    return Notice("warning", f"Warning for account {account_id}: hard-bounce rate "
                  f"{percent(detail.get('rate'))} in campaign {campaign}", "\n".join(lines))
