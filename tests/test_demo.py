"""`mta demo` runs on its embedded config and finishes every recipient."""

from __future__ import annotations

import json

import pytest

from .conftest import mta_cli


@pytest.mark.slow
def test_demo_completes_with_a_report() -> None:
    out = mta_cli("demo", "--json", timeout=180)
    assert out.returncode == 0, out.stdout[-500:] + out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["finished"] == report["submitted"] == 480
    for sd in ("mlgnserv.com", "mlgn2ca.com", "mlgn2usa.com", "mailgait.com"):
        counts = report["per_sending_domain"][sd]
        assert counts["delivered"] == 114 and counts["bounced"] == 6 and counts["deferred"] == 18
