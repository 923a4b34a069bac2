"""Operations: the systemd unit, alert rules, sd_notify, reload, and a real Prometheus."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from mta.config import load_config

from .conftest import DaemonProcess, write_config
from .sinks import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
pytestmark = pytest.mark.slow


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (scripts/test.sh installs it)")
    return path


def test_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = need("systemd-analyze")
    text = (DEPLOY / "mta.service").read_text()
    mta = shutil.which("mta") or str(ROOT / ".venv" / "bin" / "mta")
    unit = tmp_path / "mta.service"
    unit.write_text(text.replace("/opt/mta/bin/mta", mta))  # where this checkout's mta lives
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    for directive in ("Type=notify", "WatchdogSec=30", "ProtectSystem=strict", "NoNewPrivileges=yes",
                      "StateDirectory=mta", "RuntimeDirectory=mta", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                      "AmbientCapabilities=CAP_NET_BIND_SERVICE", "ExecReload=/bin/kill -HUP $MAINPID",
                      "LimitNOFILE="):
        assert directive in text


def test_alert_rules_check_and_unit_tests() -> None:
    promtool = need("promtool")
    check = subprocess.run([promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=DEPLOY / "prometheus",
                          capture_output=True, text=True, timeout=60)
    assert test.returncode == 0, test.stdout + test.stderr
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    runbook = (ROOT / "docs" / "operations.md").read_text().lower()
    for name in [line.split(":", 1)[1].strip() for line in alerts.splitlines() if "- alert:" in line]:
        assert f"### {name.lower()}" in runbook, f"no runbook entry for {name}"
    json.loads((DEPLOY / "grafana" / "mta-dashboard.json").read_text())


def test_sd_notify_reload_and_metrics(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(0.2)
    cfg = write_config(tmp_path)
    daemon = DaemonProcess(cfg)
    os.environ["NOTIFY_SOCKET"] = str(notify_path)
    os.environ["WATCHDOG_USEC"] = "1000000"
    try:
        daemon.start()
    finally:
        del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
    seen: list[str] = []

    def drain(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                seen.extend(listener.recv(4096).decode().splitlines())
            except TimeoutError:
                pass

    try:
        drain(1.5)
        assert "READY=1" in seen and seen.count("WATCHDOG=1") >= 2
        config = load_config(cfg)
        host, port = config.metrics_listen
        text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read()
        promtool = shutil.which("promtool")
        if promtool:
            check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
            assert check.returncode == 0, check.stdout + check.stderr
        good = cfg.read_text()
        cfg.write_text(good.replace('retry_schedule = ["1s", "2s"]', 'retry_schedule = ["soon"]'))
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert daemon.proc.poll() is None
        log = (tmp_path / f"daemon-{daemon.starts}.log").read_text()
        assert "config_reload_refused" in log and "queue.retry_schedule[0]" in log
        cfg.write_text(good)
    finally:
        assert daemon.stop() == 0
        drain(0.5)
        listener.close()
    assert "STOPPING=1" in seen


def test_prometheus_scrapes_the_daemon_and_loads_the_rules(tmp_path: Path) -> None:
    prometheus = need("prometheus")
    cfg = write_config(tmp_path)
    daemon = DaemonProcess(cfg)
    daemon.start()
    host, port = load_config(cfg).metrics_listen
    web = free_port()
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, evaluation_interval: 1s}}
rule_files: ["{DEPLOY}/prometheus/alerts.yml"]
scrape_configs:
  - job_name: mta
    static_configs: [{{targets: ["{host}:{port}"]}}]
""")
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path}/prometheus.yml",
                             f"--storage.tsdb.path={tmp_path}/tsdb", f"--web.listen-address=127.0.0.1:{web}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def api(path: str) -> dict[str, object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/{path}", timeout=5) as r:
            data: dict[str, object] = json.loads(r.read())
            return data

    try:
        end = time.monotonic() + 45
        up = None
        while time.monotonic() < end:
            try:
                result = api("query?query=mta_up")["data"]["result"]  # type: ignore[index]
                if result:
                    up = result[0]["value"][1]
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert up == "1", "Prometheus never scraped mta_up = 1"
        groups = api("rules")["data"]["groups"]  # type: ignore[index]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) >= 9 and all(r["health"] in ("ok", "unknown") for r in rules)
        time.sleep(2.5)  # a few evaluations
        rules = [r for g in api("rules")["data"]["groups"] for r in g["rules"]]  # type: ignore[index]
        assert all(r["health"] == "ok" for r in rules), [r for r in rules if r["health"] != "ok"]
        down = next(r for r in rules if r["name"] == "MtaDown")
        assert down["state"] == "inactive"  # the daemon is up
    finally:
        proc.terminate()
        proc.wait(10)
        daemon.stop()


async def test_reload_applies_shaping_backoff_and_warmup(daemon_factory: object, tmp_path: Path) -> None:
    d = await daemon_factory(shaping=[{"provider": "p", "match_domain": ["p.test"], "max_rate": "10/s"}])  # type: ignore[operator]
    app = d.app
    limits = app.throttles.get("mlgnserv.com", app.ready.rules.match("p.test", []))
    text = d.config_path.read_text().replace('max_rate = "10/s"', 'max_rate = "20/s"')
    d.config_path.write_text(text + '[backoff]\nhold = "7s"\n[[warmup]]\nsending_domain = "mlgnserv.com"\n'
                                    'start = "2026-01-01"\ndaily = [5]\n')
    assert app.reload()["reloaded"] is True
    assert app.ready.rules.match("p.test", []).max_rate == 20.0
    assert limits.backoff.hold == 7.0 and limits.warmup is not None
    d.config_path.write_text(text.replace('max_rate = "20/s"', 'max_rate = "fast"'))
    result = app.reload()
    assert result["reloaded"] is False and "shaping[0].max_rate" in result["error"]
    assert app.ready.rules.match("p.test", []).max_rate == 20.0  # the old config stays
