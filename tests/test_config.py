"""Config loading: every error names the key; SPEC §3 keys are all known."""

from __future__ import annotations

from pathlib import Path

import pytest

from mta.config import ConfigError, load_config, parse_duration, parse_rate

from .conftest import write_config

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_example_config_loads() -> None:
    cfg = load_config(ROOT / "config" / "mta.toml")
    assert set(cfg.sending_domains) == {"mlgnserv.com", "mlgn2ca.com", "mlgn2usa.com", "mailgait.com"}
    assert cfg.retry_schedule[0] == 300.0
    assert cfg.max_age == 3 * 86400
    google = next(r for r in cfg.shaping if r.provider == "google")
    assert google.max_rate == pytest.approx(5.0)
    # keys of features that are not built yet are accepted and reported, never refused
    assert cfg.not_yet_in_effect == ()  # cluster.redis_url is empty in the example
    assert cfg.retention == 30 * 86400 and cfg.audit_log == "/var/lib/mta/audit.jsonl"


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("5m", 300), ("2h", 7200), ("3d", 259200), ("250ms", 0.25)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text, "k") == pytest.approx(seconds)


@pytest.mark.parametrize("text,per_second", [("10/s", 10), ("600/min", 10), ("3600/h", 1)])
def test_rates(text: str, per_second: float) -> None:
    assert parse_rate(text, "k") == pytest.approx(per_second)


@pytest.mark.parametrize("extra,needle", [
    ('[queue]\nretry_schedule = ["soon"]\n', "queue.retry_schedule[0]"),
    ("[policy]\nmin_sample = -3\n", "policy.min_sample"),
    ("[policy]\nabuse_pause = 2\n", "policy.abuse_pause"),
    ("[daemon]\nstate_dirr = '/x'\n", "daemon.state_dirr: unknown key"),
    ('[[shaping]]\nmax_rate = "fast"\n', "shaping[0].max_rate"),
    ('[dns]\nnameservers = ["127.0.0.1:notaport"]\n', "dns.nameservers[0]"),
    ("[sending_domains.\"x.com\"]\ndkim = { selector = 's1' }\n", "sending_domains.x.com.dkim.key_file"),
])
def test_bad_values_are_refused_naming_the_key(tmp_path: Path, extra: str, needle: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'[security]\ntoken_key_file = "/k"\n[sending_domains."a.com"]\nehlo = "x"\n{extra}')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)


def test_toml_syntax_error_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[daemon\nstate_dir = \n")
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_config(path)


def test_test_config_round_trip(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path, static={"a.test": ["127.0.0.2:2525"]}))
    assert cfg.dns_static["a.test"] == (("127.0.0.2", 2525),)
    assert cfg.audit_log.endswith("audit.jsonl")
