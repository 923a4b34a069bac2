"""`mta` commands (SPEC §2). Thin: each admin command is one request on a socket.

With --json a command prints exactly one JSON value (the result, exit 0; or
{"ok": false, "error": {...}}, exit 1). --config, --json and --socket may stand anywhere
after the command words.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any

DEFAULT_CONTROL = "/run/mta/control.sock"


class CliError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# -- talking to the daemon ------------------------------------------------------------
def request(path: str, payload: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise CliError("unavailable", f"cannot connect to {path}: {exc.strerror or exc} (is `mta run` up?)") from None
    try:
        sock.sendall(json.dumps(payload, separators=(",", ":")).encode() + b"\n")
        with sock.makefile("rb") as f:
            line = f.readline()
    except OSError as exc:
        raise CliError("unavailable", f"{path}: {exc}") from None
    finally:
        sock.close()
    if not line:
        raise CliError("unavailable", f"{path} closed the connection without an answer")
    answer: dict[str, Any] = json.loads(line)
    return answer


def _config_value(args: argparse.Namespace, key: str) -> str | None:
    if not args.config:
        return None
    from .config import ConfigError, load_config

    try:
        return str(getattr(load_config(args.config), key))
    except ConfigError as exc:
        raise CliError("invalid_config", str(exc)) from None


def control_socket(args: argparse.Namespace) -> str:
    return args.socket or _config_value(args, "control_socket") or DEFAULT_CONTROL


def control(args: argparse.Namespace, op: str, **fields: Any) -> Any:
    answer = request(control_socket(args), {"op": op, **fields})
    if answer.get("ok") is not True:
        err = answer.get("error") or {}
        raise CliError(str(err.get("code", "error")), str(err.get("message", answer)))
    return answer.get("result")


# -- output ---------------------------------------------------------------------------
def emit(args: argparse.Namespace, result: Any, human: Any = None) -> None:
    if args.json:
        print(json.dumps(result, separators=(",", ":"), default=str))
    elif human is not None:
        human(result)
    else:
        from rich.console import Console

        Console().print_json(data=result)


def _table(rows: list[dict[str, Any]], columns: list[str], title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None)
    for c in columns:
        table.add_column(c, justify="right" if rows and isinstance(rows[0].get(c), (int, float)) else "left")
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in columns))
    Console().print(table)


# -- commands -------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from .app import run

    if not args.config:
        raise CliError("invalid_argument", "mta run needs --config PATH")
    return run(args.config)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(keep=args.keep, json_out=args.json)


def cmd_submit(args: argparse.Namespace) -> int:
    if args.file == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            with open(args.file, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise CliError("invalid_argument", f"{args.file}: {exc.strerror}") from None
    try:
        job = json.loads(data)
    except ValueError as exc:
        raise CliError("malformed_request", f"{args.file}: not JSON: {exc}") from None
    if not isinstance(job, dict):
        raise CliError("malformed_request", f"{args.file}: a job is a JSON object")
    job.setdefault("op", "submit")
    path = args.socket or _config_value(args, "submit_socket") or "/run/mta/submit.sock"
    answer = request(path, job, timeout=600)
    print(json.dumps(answer, separators=(",", ":")) if args.json else json.dumps(answer, indent=2))
    return 0 if answer.get("ok") else 1


def cmd_status(args: argparse.Namespace) -> int:
    def human(s: dict[str, Any]) -> None:
        from rich.console import Console

        c = Console()
        q, t = s["queue"], s["totals"]
        c.print(f"[bold]mta[/bold] pid {s['pid']} up {s['uptime_s']:.0f}s  accounts {s['accounts']}")
        c.print(f"queue: ready {q['ready']}  deferred {q['deferred']}  held {q['held']}")
        c.print("since start: " + "  ".join(f"{k} {v}" for k, v in t.items())
                + f"   rate {s.get('rate_per_minute', 0)}/min")
        sp = s["spool"]
        c.print(f"spool: {sp['bytes'] / 1e6:.1f} MB, disk free {sp['disk_free_bytes'] / 1e9:.1f} GB"
                + (f", [red]error {sp['error']}[/red]" if sp["error"] else ""))
        if s["connections"]:
            _table(s["connections"], ["sending_domain", "provider", "queued", "connections"], "ready queues")
        if s.get("throttles"):
            _table(s["throttles"], ["sending_domain", "provider", "max_rate", "current_rate", "fraction",
                                    "suspended_for", "connections", "max_connections", "decisions"], "throttles")
        if s["paused_accounts"]:
            _table(s["paused_accounts"], ["id", "reason"], "paused accounts")

    emit(args, control(args, "status"), human)
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    by = args.by.replace("-", "_")
    emit(args, control(args, "queue", by=args.by),
         lambda rows: _table(rows, [by, "ready", "deferred", "held", "total"], f"queue by {args.by}"))
    return 0


ACCOUNT_COLUMNS = ["id", "plan", "status", "pause_reason", "subscribers", "sent_this_month", "monthly_cap",
                   "hard_bounce_threshold"]


def cmd_accounts(args: argparse.Namespace) -> int:
    action = args.action
    if action == "list":
        emit(args, control(args, "accounts.list"), lambda rows: _table(rows, ACCOUNT_COLUMNS, "accounts"))
        return 0
    if action == "set":
        fields = {"id": args.id, "plan": args.plan, "subscribers": args.subscribers, "notify": args.notify,
                  "status": args.status, "hard_bounce_threshold": args.hard_bounce_threshold,
                  "credits": args.credits, "created": args.created, "no_footer": True if args.no_footer else None}
        emit(args, control(args, "accounts.set", **fields))
        return 0
    result = control(args, f"accounts.{action}", id=args.id, **({"reason": args.reason} if action == "pause" else {}))
    emit(args, result)
    return 0


def cmd_privacy_erase(args: argparse.Namespace) -> int:
    emit(args, control(args, "privacy.erase", address=args.address))
    return 0


AUDIT_COLUMNS = ["time", "action", "args", "peer", "result"]


def cmd_audit(args: argparse.Namespace) -> int:
    emit(args, control(args, "audit", since=args.since),
         lambda rows: _table(rows, AUDIT_COLUMNS, "audit trail"))
    return 0


REVIEW_COLUMNS = ["id", "account", "campaign", "recipient", "subject", "queued_at"]


def cmd_review(args: argparse.Namespace) -> int:
    if args.action == "list":
        emit(args, control(args, "review.list", account=args.account, limit=args.limit),
             lambda rows: _table(rows, REVIEW_COLUMNS, "waiting for review"))
        return 0
    if not args.ids and not args.all:
        raise CliError("invalid_argument", f"mta review {args.action} needs message ids, or --account ID --all")
    emit(args, control(args, f"review.{args.action}", ids=args.ids, account=args.account, all=args.all))
    return 0


SUPPRESS_COLUMNS = ["account", "address", "hash", "reason", "time"]


def cmd_suppress(args: argparse.Namespace) -> int:
    if args.action == "list":
        emit(args, control(args, "suppress.list", account=args.account),
             lambda rows: _table(rows, SUPPRESS_COLUMNS, f"suppression: {args.account or 'global'}"))
        return 0
    emit(args, control(args, f"suppress.{args.action}", account=args.account, address=args.address))
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    after = args.after
    while True:
        page = control(args, "events", after=after, limit=args.limit)
        events = page.get("events", [])
        if args.json and not args.follow:
            print(json.dumps(events, separators=(",", ":")))
            return 0
        for event in events:
            print(json.dumps(event, separators=(",", ":")), flush=True)
        after = page.get("next", after)
        if not args.follow:
            return 0
        if not events:
            time.sleep(1.0)


def cmd_bounce_classify(args: argparse.Namespace) -> int:
    """Offline classification of saved mails (SPEC §2): no daemon, no config."""
    from .bounce.analyse import analyse

    failed = 0
    for path in args.files:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            failed += 1
            print(f"mta: {path}: {exc.strerror}", file=sys.stderr)
            continue
        results = [r.as_dict() for r in analyse(raw)]
        if args.json:
            print(json.dumps({"file": path, "results": results}, separators=(",", ":")), flush=True)
        elif results:
            _table(results, ["recipient", "kind", "reason", "status", "replycode", "feedback_type"], title=path)
        else:
            print(f"{path}: not a bounce, report or reply")
    return 1 if failed else 0


def cmd_reload(args: argparse.Namespace) -> int:
    result = control(args, "reload")
    emit(args, result)
    return 0 if result.get("reloaded") else 1


# -- parser -----------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="the daemon's config file (its sockets are used)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON value")
    p.add_argument("--socket", help="socket path (default: from --config, else /run/mta/control.sock)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mta", description="bulk mail delivery daemon")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        _common(p)
        p.set_defaults(func=func)
        return p

    command("run", cmd_run, "run the daemon in the foreground")
    demo = command("demo", cmd_demo, "self-contained tour on this machine (no network)")
    demo.add_argument("--keep", action="store_true", help="keep the demo's temp directory")
    p = command("submit", cmd_submit, "submit a job (JSON file, - for stdin)")
    p.add_argument("file")
    command("status", cmd_status, "daemon health, queues, throughput, paused accounts")
    p = command("queue", cmd_queue, "queue summary")
    p.add_argument("--by", choices=["domain", "account", "campaign", "sending-domain"], default="domain")
    p = command("events", cmd_events, "read the event feed")
    p.add_argument("--after", type=int, default=0)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--follow", action="store_true")
    command("reload", cmd_reload, "re-read the config (same as SIGHUP)")

    def group(name: str, help_text: str, func: Any, actions: tuple[str, ...],
              action_help: dict[str, str] | None = None) -> dict[str, argparse.ArgumentParser]:
        """`mta NAME ACTION ...`: one sub-command per action, each with the common options."""
        actions_of = sub.add_parser(name, help=help_text).add_subparsers(dest="action", required=True)
        parsers = {}
        for action in actions:
            ap = actions_of.add_parser(action, help=(action_help or {}).get(action))
            _common(ap)
            ap.set_defaults(func=func)
            parsers[action] = ap
        return parsers

    bounce = group("bounce", "bounce tools", cmd_bounce_classify, ("classify",),
                   {"classify": "classify saved bounce, ARF and reply mails"})
    bounce["classify"].add_argument("files", nargs="+", metavar="FILE")

    for action, sp in group("suppress", "suppression lists", cmd_suppress, ("list", "add", "remove")).items():
        if action != "list":
            sp.add_argument("address", help="an address (remove also takes its hash)")
        sp.add_argument("--account", help="the account's list (default: the global list)")

    privacy = group("privacy", "data protection (SPEC §12)", cmd_privacy_erase, ("erase",),
                    {"erase": "remove an address from queued mail, events and logs; keep it suppressed"})
    privacy["erase"].add_argument("address")
    p = command("audit", cmd_audit, "the audit trail of admin actions")
    p.add_argument("--since", help="a time (2026-11-22T10:00:00Z) or a duration back from now (2h, 7d)")

    review = group("review", "trial-account messages waiting for manual review", cmd_review,
                   ("list", "approve", "reject"))
    for action, rp in review.items():
        rp.add_argument("--account", help="only this account's messages")
        if action == "list":
            rp.add_argument("--limit", type=int, default=1000)
        else:
            rp.add_argument("ids", nargs="*", metavar="MSG", help="ids from `mta review list`")
            rp.add_argument("--all", action="store_true", help="every waiting message of --account")

    accounts = group("accounts", "account admin", cmd_accounts,
                     ("list", "show", "approve", "pause", "resume", "set", "delete"))
    for action, ap in accounts.items():
        if action != "list":
            ap.add_argument("id")
    accounts["pause"].add_argument("--reason", default="paused by an admin")
    ap = accounts["set"]
    ap.add_argument("--plan", choices=["trial", "free", "monthly", "payg"])
    ap.add_argument("--subscribers", type=int)
    ap.add_argument("--notify")
    ap.add_argument("--status", choices=["active", "review"])
    ap.add_argument("--hard-bounce-threshold", type=float)
    ap.add_argument("--credits", type=int)
    ap.add_argument("--created")
    ap.add_argument("--no-footer", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": {"code": exc.code, "message": exc.message}}))
        else:
            print(f"mta: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
