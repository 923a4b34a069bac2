"""TOML config -> frozen, validated settings (SPEC §3). The only reader of config files.

Every error names the key it is about (`queue.retry_schedule[0]: ...`), so an operator
can fix a file without reading code. Unknown keys are refused (a typo must not silently
fall back to a default); keys of SPEC §3 whose feature is not built yet are accepted
and reported by `Config.not_yet_in_effect`.
"""

from __future__ import annotations

import email.utils
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANAGED_DOMAINS = ("mlgnserv.com", "mlgn2ca.com", "mlgn2usa.com", "mailgait.com")

# Sections/keys accepted now but whose feature arrives with a later issue.
NOT_YET: dict[str, str] = {}


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key and the reason."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
               "h": 3600.0, "hour": 3600.0}


def parse_duration(value: object, key: str) -> float:
    """'5m' -> 300.0 seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ConfigError(f"{key}: {value!r} is not a duration (write it like \"30s\", \"5m\", \"2h\" or \"3d\")")


def parse_rate(value: object, key: str) -> float:
    """'300/min' -> 5.0 messages per second."""
    if isinstance(value, str):
        m = _RATE.match(value)
        if m and float(m.group(1)) > 0:
            return float(m.group(1)) / _RATE_UNITS[m.group(2)]
    raise ConfigError(f"{key}: {value!r} is not a rate (write it like \"10/s\", \"300/min\" or \"5000/h\")")


def parse_hostport(value: object, key: str, default_port: int) -> tuple[str, int]:
    """'127.0.0.1:5353' / '[::1]:25' / 'host' -> (host, port)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: {value!r} is not a host or host:port")
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise ConfigError(f"{key}: {value!r} has a port that is not a number") from None
    if not host or not 0 < port < 65536:
        raise ConfigError(f"{key}: {value!r} is not a valid host:port")
    return host, port


# -- the settings -------------------------------------------------------------------
@dataclass(frozen=True)
class DkimKey:
    selector: str
    key_file: str
    algorithm: str = "rsa-sha256"


@dataclass(frozen=True)
class SendingDomain:
    name: str
    ehlo: str
    source_ips: tuple[str, ...]
    bounce_domain: str
    dkim: tuple[DkimKey, ...] = ()


@dataclass(frozen=True)
class ShapingRule:
    provider: str
    match_mx: tuple[str, ...]
    match_domain: tuple[str, ...]
    max_connections: int
    max_messages_per_connection: int
    max_rate: float | None  # messages per second; None: no rate limit

    @property
    def is_default(self) -> bool:
        return not self.match_mx and not self.match_domain


@dataclass(frozen=True)
class Timeouts:
    """RFC 5321 §4.5.3.2 timeouts, seconds."""

    connect: float = 30.0
    greeting: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data: float = 120.0
    data_block: float = 180.0
    final_dot: float = 600.0


@dataclass(frozen=True)
class Policy:
    min_sample: int = 200
    hard_bounce_warn: float = 0.08
    abuse_pause: float = 0.005
    unsubscribe_pause: float = 0.01
    notice_from: str = "Mailigen Compliance <compliance@mlgnserv.com>"
    # Not in SPEC §3: how many remote replies naming a blocklist pause an account ("past a
    # small count", SPEC §1), counted since the account was last resumed.
    blocklist_pause: int = 5

    @property
    def notice_address(self) -> str:
        return email.utils.parseaddr(self.notice_from)[1]


@dataclass(frozen=True)
class Backoff:
    hold: float = 300.0
    min_rate_fraction: float = 0.1
    recovery_step: float = 60.0


@dataclass(frozen=True)
class Warmup:
    sending_domain: str
    start: str
    daily: tuple[int, ...]


@dataclass(frozen=True)
class Config:
    path: str
    state_dir: str
    submit_socket: str
    submit_group: str
    allowed_uids: tuple[int, ...]
    control_socket: str
    metrics_listen: tuple[str, int]
    listener_listen: tuple[str, int]
    fbl_addresses: tuple[str, ...]
    unsubscribe_local_part: str
    nameservers: tuple[tuple[str, int], ...]
    dns_static: dict[str, tuple[tuple[str, int], ...]]
    retry_schedule: tuple[float, ...]
    max_age: float
    policy: Policy
    timeouts: Timeouts
    backoff: Backoff
    footer_text: str
    footer_html: str
    warmup: tuple[Warmup, ...]
    token_key_file: str
    retention: float
    audit_log: str
    redis_url: str
    sending_domains: dict[str, SendingDomain]
    max_line_bytes: int
    max_recipients_per_job: int
    max_message_size: int
    shaping: tuple[ShapingRule, ...]
    not_yet_in_effect: tuple[str, ...] = field(default=())


# -- reading helpers ----------------------------------------------------------------
class _Section:
    """A TOML table being read: tracks which keys were used, so leftovers are refused."""

    def __init__(self, data: object, name: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: must be a table, not {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.name = name
        self.used: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.name}.{k}" if self.name else k

    def get(self, k: str, default: Any) -> Any:
        self.used.add(k)
        return self.data.get(k, default)

    def has(self, k: str) -> bool:
        return k in self.data

    def string(self, k: str, default: str, *, required: bool = False) -> str:
        if required and k not in self.data:
            raise ConfigError(f"{self.key(k)}: is required")
        v = self.get(k, default)
        if not isinstance(v, str):
            raise ConfigError(f"{self.key(k)}: must be a string, not {v!r}")
        return v

    def integer(self, k: str, default: int, *, minimum: int = 0) -> int:
        v = self.get(k, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self.key(k)}: must be a whole number, not {v!r}")
        if v < minimum:
            raise ConfigError(f"{self.key(k)}: must be at least {minimum}, not {v}")
        return v

    def fraction(self, k: str, default: float) -> float:
        v = self.get(k, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ConfigError(f"{self.key(k)}: must be a number between 0 and 1, not {v!r}")
        return float(v)

    def duration(self, k: str, default: float) -> float:
        return parse_duration(self.get(k, default), self.key(k))

    def str_list(self, k: str, default: list[str]) -> tuple[str, ...]:
        v = self.get(k, default)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{self.key(k)}: must be a list of strings, not {v!r}")
        return tuple(v)

    def table(self, k: str) -> _Section:
        return _Section(self.get(k, {}), self.key(k))

    def finish(self) -> None:
        extra = sorted(set(self.data) - self.used)
        if extra:
            raise ConfigError(f"{self.key(extra[0])}: unknown key")


def _sending_domain(name: str, sec: _Section) -> SendingDomain:
    ehlo = sec.string("ehlo", f"mta.{name}")
    ips = sec.str_list("source_ips", [])
    bounce = sec.string("bounce_domain", f"bounces.{name}")
    raw = sec.get("dkim", None)
    keys: list[DkimKey] = []
    entries = raw if isinstance(raw, list) else ([] if raw is None else [raw])
    for i, entry in enumerate(entries):
        label = sec.key("dkim") + (f"[{i}]" if isinstance(raw, list) else "")
        d = _Section(entry, label)
        algorithm = d.string("algorithm", "rsa-sha256")
        if algorithm not in ("rsa-sha256", "ed25519-sha256"):
            raise ConfigError(f"{d.key('algorithm')}: must be rsa-sha256 or ed25519-sha256, not {algorithm!r}")
        keys.append(DkimKey(d.string("selector", "", required=True), d.string("key_file", "", required=True),
                            algorithm))
        d.finish()
    sec.finish()
    return SendingDomain(name, ehlo, ips, bounce, tuple(keys))


def _shaping(i: int, sec: _Section) -> ShapingRule:
    rate_text = sec.get("max_rate", None)
    rate = None if rate_text is None else parse_rate(rate_text, sec.key("max_rate"))
    mx = tuple(s.lower() for s in sec.str_list("match_mx", []))
    dom = tuple(s.lower() for s in sec.str_list("match_domain", []))
    default_name = "default" if not mx and not dom else (dom[0] if dom else mx[0].lstrip("."))
    rule = ShapingRule(
        provider=sec.string("provider", default_name),
        match_mx=mx,
        match_domain=dom,
        max_connections=sec.integer("max_connections", 10, minimum=1),
        max_messages_per_connection=sec.integer("max_messages_per_connection", 100, minimum=1),
        max_rate=rate,
    )
    sec.finish()
    return rule


def parse_config(data: dict[str, Any], path: str = "<config>") -> Config:
    """Validate a parsed TOML document into a Config (raises ConfigError)."""
    top = _Section(data, "")
    pending: list[str] = []

    daemon = top.table("daemon")
    state_dir = daemon.string("state_dir", "/var/lib/mta")
    submit_socket = daemon.string("submit_socket", "/run/mta/submit.sock")
    submit_group = daemon.string("submit_group", "")
    uids = daemon.get("allowed_uids", [])
    if not isinstance(uids, list) or not all(isinstance(u, int) and not isinstance(u, bool) for u in uids):
        raise ConfigError(f"daemon.allowed_uids: must be a list of numeric uids, not {uids!r}")
    control_socket = daemon.string("control_socket", "/run/mta/control.sock")
    daemon.finish()

    metrics = top.table("metrics")
    metrics_listen = parse_hostport(metrics.string("listen", "127.0.0.1:9325"), "metrics.listen", 9325)
    metrics.finish()

    listener = top.table("listener")
    listener_listen = parse_hostport(listener.string("listen", "0.0.0.0:25"), "listener.listen", 25)
    fbl = listener.str_list("fbl_addresses", ["fbl@mlgnserv.com"])
    unsub = listener.string("unsubscribe_local_part", "unsub")
    if not re.fullmatch(r"[a-z0-9]+", unsub):
        raise ConfigError(f"listener.unsubscribe_local_part: {unsub!r} must be lower-case letters and digits")
    listener.finish()

    dns = top.table("dns")
    nameservers = tuple(parse_hostport(v, f"dns.nameservers[{i}]", 53)
                        for i, v in enumerate(dns.str_list("nameservers", [])))
    static_sec = dns.table("static")
    static: dict[str, tuple[tuple[str, int], ...]] = {}
    for domain in list(static_sec.data):
        hosts = static_sec.str_list(domain, [])
        if not hosts:
            raise ConfigError(f"dns.static.{domain}: must list at least one MX host")
        static[domain.lower().rstrip(".")] = tuple(
            parse_hostport(h, f"dns.static.{domain}[{i}]", 25) for i, h in enumerate(hosts))
    static_sec.finish()
    dns.finish()

    queue = top.table("queue")
    sched = queue.get("retry_schedule", ["5m", "10m", "20m", "40m", "1h", "2h", "4h"])
    if not isinstance(sched, list) or not sched:
        raise ConfigError(f"queue.retry_schedule: must be a non-empty list of durations, not {sched!r}")
    retry = tuple(parse_duration(v, f"queue.retry_schedule[{i}]") for i, v in enumerate(sched))
    if any(r <= 0 for r in retry):
        raise ConfigError("queue.retry_schedule: every interval must be longer than zero")
    max_age = queue.duration("max_age", 3 * 86400.0)
    queue.finish()

    pol = top.table("policy")
    policy = Policy(
        min_sample=pol.integer("min_sample", 200, minimum=1),
        hard_bounce_warn=pol.fraction("hard_bounce_warn", 0.08),
        abuse_pause=pol.fraction("abuse_pause", 0.005),
        unsubscribe_pause=pol.fraction("unsubscribe_pause", 0.01),
        notice_from=pol.string("notice_from", Policy.notice_from),
        blocklist_pause=pol.integer("blocklist_pause", 5, minimum=1),
    )
    pol.finish()
    notice_addr = policy.notice_address
    if "@" not in notice_addr or any(c in policy.notice_from for c in "\r\n\0"):
        raise ConfigError(f"policy.notice_from: {policy.notice_from!r} is not an address like "
                          "\"Compliance <compliance@mlgnserv.com>\"")

    delivery = top.table("delivery")
    tsec = delivery.table("timeouts")
    defaults = Timeouts()
    timeouts = Timeouts(**{name: tsec.duration(name, getattr(defaults, name))
                           for name in Timeouts.__dataclass_fields__})
    tsec.finish()
    delivery.finish()

    bo = top.table("backoff")
    backoff = Backoff(hold=bo.duration("hold", 300.0), min_rate_fraction=bo.fraction("min_rate_fraction", 0.1),
                      recovery_step=bo.duration("recovery_step", 60.0))
    bo.finish()

    footer = top.table("footer")
    footer_text = footer.string("text", "Email marketing by Mailigen")
    footer_html = footer.string("html", '<p style="font-size:11px;color:#888">Email marketing by Mailigen</p>')
    footer.finish()

    warmups: list[Warmup] = []
    raw_warmup = top.get("warmup", [])
    if not isinstance(raw_warmup, list):
        raise ConfigError("warmup: must be an array of tables ([[warmup]])")
    for i, entry in enumerate(raw_warmup):
        w = _Section(entry, f"warmup[{i}]")
        daily = w.get("daily", [])
        if not isinstance(daily, list) or not all(isinstance(n, int) and n > 0 for n in daily):
            raise ConfigError(f"warmup[{i}].daily: must be a list of positive whole numbers, not {daily!r}")
        warmups.append(Warmup(w.string("sending_domain", "", required=True), str(w.get("start", "")),
                              tuple(daily)))
        w.finish()

    security = top.table("security")
    token_key_file = security.string("token_key_file", "/etc/mta/token.key")
    security.finish()

    privacy = top.table("privacy")
    retention = privacy.duration("retention", 30 * 86400.0)
    audit_log = privacy.string("audit_log", "")
    privacy.finish()

    cluster = top.table("cluster")
    redis_url = cluster.string("redis_url", "")
    cluster.finish()
    if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("cluster.redis_url: must start with redis://, rediss:// or unix:// (or be empty)")

    sds_sec = top.table("sending_domains")
    sending: dict[str, SendingDomain] = {}
    for name in list(sds_sec.data):
        sending[name.lower()] = _sending_domain(name.lower(), sds_sec.table(name))
    sds_sec.finish()
    if not sending:
        raise ConfigError("sending_domains: at least one sending domain must be configured")

    submit = top.table("submit")
    max_line = submit.integer("max_line_bytes", 64 * 1024 * 1024, minimum=1024)
    max_rcpts = submit.integer("max_recipients_per_job", 100_000, minimum=1)
    max_size = submit.integer("max_message_size", 10 * 1024 * 1024, minimum=1024)
    submit.finish()

    raw_shaping = top.get("shaping", [])
    if not isinstance(raw_shaping, list):
        raise ConfigError("shaping: must be an array of tables ([[shaping]])")
    shaping = tuple(_shaping(i, _Section(e, f"shaping[{i}]")) for i, e in enumerate(raw_shaping))
    if sum(1 for r in shaping if r.is_default) > 1:
        raise ConfigError("shaping: more than one rule without match_mx/match_domain (only one default)")

    top.finish()
    return Config(
        path=path, state_dir=state_dir, submit_socket=submit_socket, submit_group=submit_group,
        allowed_uids=tuple(uids), control_socket=control_socket, metrics_listen=metrics_listen,
        listener_listen=listener_listen, fbl_addresses=tuple(a.lower() for a in fbl),
        unsubscribe_local_part=unsub, nameservers=nameservers, dns_static=static, retry_schedule=retry,
        max_age=max_age, policy=policy, timeouts=timeouts, backoff=backoff, footer_text=footer_text,
        footer_html=footer_html, warmup=tuple(warmups), token_key_file=token_key_file,
        retention=retention, audit_log=audit_log or str(Path(state_dir) / "audit.jsonl"),
        redis_url=redis_url, sending_domains=sending, max_line_bytes=max_line,
        max_recipients_per_job=max_rcpts, max_message_size=max_size, shaping=shaping,
        not_yet_in_effect=tuple(k for k in NOT_YET if k in pending),
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file (raises ConfigError naming the key)."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: TOML syntax error: {exc}") from None
    return parse_config(data, str(p))
