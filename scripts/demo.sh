#!/usr/bin/env bash
# Install mta into .venv and run the self-contained demo (no network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check .
exec .venv/bin/mta demo "$@"
