"""Score the bounce classifier on a labelled corpus (issue 5's accuracy bar).

    python -m bench.bounce_accuracy [--corpus ../shared/corpus/bounces] [--show-misses]

The corpus is NNNN.eml files and labels.jsonl (sisimai's expected reason, hardbounce,
feedback type and a recipient hint per row). Each label row is paired with a result of
`mta.bounce.analyse` by recipient when both name one, else in order. Prints hard/soft
agreement, reason agreement, ARF detection, auto-reply detection and recall.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path
from typing import Any

from mta.bounce.analyse import Result, analyse

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpus" / "bounces"
NOT_BOUNCE = {"feedback", "vacation", "delivered", "onhold", "undefined", None}
TARGETS = {"hard_soft": 0.97, "reason": 0.90, "fbl": 0.98, "recall": 0.97}


def _norm(address: str | None) -> str | None:
    if not address:
        return None
    address = address.split(";", 1)[-1].strip().strip("<>").strip().lower()
    return address or None


def _pair(rows: list[dict[str, Any]], results: list[Result]) -> list[Result | None]:
    free = list(range(len(results)))
    paired: dict[int, Result] = {}
    for i, row in enumerate(rows):
        want = _norm(row.get("recipient"))
        for k in free:
            if want and _norm(results[k].recipient) == want:
                paired[i] = results[k]
                free.remove(k)
                break
    for i in range(len(rows)):
        if i not in paired and free:
            paired[i] = results[free.pop(0)]
    return [paired.get(i) for i in range(len(rows))]


def score(corpus: Path) -> tuple[dict[str, float], collections.Counter[str], list[str]]:
    rows_by_file: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for line in (corpus / "labels.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows_by_file[row["file"]].append(row)
    c: collections.Counter[str] = collections.Counter()
    misses: list[str] = []
    for name, rows in sorted(rows_by_file.items()):
        rows.sort(key=lambda r: r.get("index") or 0)
        results = analyse((corpus / name).read_bytes())
        for row, got in zip(rows, _pair(rows, results), strict=True):
            reason = row.get("reason")
            if reason not in NOT_BOUNCE:
                c["bounce"] += 1
                c["found"] += bool(got and got.kind != "none")
                want_kind = "hard" if row.get("hardbounce") else "soft"
                c["hard_soft"] += bool(got and got.kind == want_kind)
                c["reason"] += bool(got and got.reason == reason)
                if not got or got.reason != reason or got.kind != want_kind:
                    misses.append(f"{name} {row.get('decoder')}: want {reason}/{want_kind} "
                                  f"got {got.reason if got else None}/{got.kind if got else None}")
            elif reason == "feedback":
                c["fbl_n"] += 1
                want_type = (row.get("feedbacktype") or "").lower()
                ok = bool(got and got.kind == "complaint" and (not want_type or got.feedback_type == want_type))
                c["fbl"] += ok
                if not ok:
                    misses.append(f"{name} ARF: want {want_type} got {got}")
            elif reason == "vacation":
                c["vacation_n"] += 1
                c["vacation"] += bool(got and got.kind == "auto_reply")
            elif reason is None:
                c["negative_n"] += 1
                c["negative"] += all(r.kind == "none" for r in results)
    figures = {
        "hard_soft": c["hard_soft"] / max(1, c["bounce"]),
        "reason": c["reason"] / max(1, c["bounce"]),
        "fbl": c["fbl"] / max(1, c["fbl_n"]),
        "recall": c["found"] / max(1, c["bounce"]),
        "auto_reply": c["vacation"] / max(1, c["vacation_n"]),
        "negatives": c["negative"] / max(1, c["negative_n"]),
    }
    return figures, c, misses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--show-misses", action="store_true")
    args = ap.parse_args()
    figures, counts, misses = score(args.corpus)
    if args.show_misses:
        print("\n".join(misses))
    print(f"bounce rows {counts['bounce']}, feedback rows {counts['fbl_n']}, "
          f"auto-reply rows {counts['vacation_n']}, negatives {counts['negative_n']}")
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))
    ok = all(figures[k] >= v for k, v in TARGETS.items())
    print("targets " + ("met" if ok else "NOT met"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
