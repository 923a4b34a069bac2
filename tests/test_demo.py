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
    assert report["finished"] == report["submitted"] == 1300
    for sd in ("mlgnserv.com", "mlgn2ca.com", "mailgait.com"):
        assert report["per_sending_domain"][sd] == {"delivered": 245, "deferred": 45, "bounced": 5}
    # mlgn2usa.com also carries bulk-deals: an old list (38 of 150 gone) and a held, then released, sale
    assert report["per_sending_domain"]["mlgn2usa.com"] == {"delivered": 245 + 112 + 150, "deferred": 45,
                                                            "bounced": 5 + 38}
    # the policy story: paused for hard bounces, the notice, held mail, resumed
    [paused] = report["paused_accounts"]
    assert paused["id"] == "bulk-deals" and paused["reason"] == "hard_bounce_rate"
    assert paused["detail"]["campaign"] == "old-list" and paused["detail"]["rate"] >= 0.08
    notice = report["notice"]
    assert notice["to"] == "bulk-deals@notify.demo" and "old-list" in notice["text"]
    assert report["held_at_pause"] > 0 and report["status_after_resume"] == "active"
    # demo-shop's four spam reports were counted and stayed under the 0.5 % threshold
    assert report["complaints"] == 4
    assert [c["complaints"] for c in report["campaigns"]["demo-shop"]] == [1, 1, 1, 1]
