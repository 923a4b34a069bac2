#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests need, then lint, types, tests.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the tests use for real (not mocked): dnsmasq as the DNS server,
# promtool and prometheus for the alert rules and a scrape, systemd-analyze for the unit,
# redis-server for cluster mode.
missing=()
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq-base)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)       # promtool and a real Prometheus
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)   # systemd-analyze verify
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server) # cluster mode (SPEC §10)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing ${missing[*]} (apt-get)"
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

echo "== ruff";   .venv/bin/ruff check mta tests bench
echo "== layers"; .venv/bin/lint-imports --no-cache >/dev/null || .venv/bin/lint-imports --no-cache
echo "== mypy";   .venv/bin/mypy
echo "== pytest"; exec .venv/bin/python -m pytest "$@"
