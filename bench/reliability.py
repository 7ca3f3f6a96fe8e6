#!/usr/bin/env python3
"""Reliability figures: run the fault matrix, collect what each fault cost, write the table.

    .venv/bin/python bench/reliability.py [--rounds N] [--slow] [--update-docs]
    .venv/bin/python bench/reliability.py --from-log FILE [--from-log FILE2] [--update-docs]

Runs tests/integration/test_faults.py (the real daemon, real Docker, Synapse, PostgreSQL and
Redis) `--rounds` times with SS_RELIABILITY_LOG set: every fault the tests inject appends one
JSON line (fault, seconds until the stack was ready again or until the broken container was
marked failed, messages lost). `--slow` also runs the long variant (five SIGKILLs per role).
The test with marker dockerd_restart restarts the host's dockerd and skips itself when other
test stacks run; its row is absent then.

Writes bench/results/reliability.json and prints the Markdown table; --update-docs replaces the
table in docs/reliability.md (between the reliability-table markers). The tests assert
recovery and zero loss, never timings: the times here come from a shared 2-core machine and
are noisy; look at medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "reliability.json"
DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- BEGIN reliability-table -->", "<!-- END reliability-table -->"
ORDER = [
    "SIGKILL sync", "SIGKILL event_persister", "SIGKILL federation_sender",
    "SIGKILL client_reader", "SIGKILL proxy", "SIGKILL main", "SIGKILL postgres", "SIGKILL redis",
    "daemon SIGKILL mid-start (infrastructure starting)",
    "daemon SIGKILL mid-start (main ready, workers starting)", "dockerd restart",
    "worker exits at once on every start", "worker OOM-killed on every start (40m limit)",
    "config mount unreadable, worker SIGKILLed", "config mount fixed, then synapsectl restart",
]


def run_tests(rounds: int, slow: bool, log: Path) -> list[dict]:
    runs = []
    for n in range(1, rounds + 1):
        cmd = [sys.executable, "-m", "pytest", "tests/integration/test_faults.py", "-q",
               "-rfEsxX", "-p", "no:cacheprovider", "-m",
               "slow or not slow" if slow else "not slow"]
        print(f"round {n}/{rounds}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "SS_RELIABILITY_LOG": str(log)},
                              capture_output=True, text=True)
        tail = proc.stdout.strip().splitlines()[-1:] or [""]
        print(f"  exit {proc.returncode} in {time.monotonic() - t0:.0f}s: {tail[0]}",
              file=sys.stderr, flush=True)
        runs.append({"round": n, "exit": proc.returncode, "summary": tail[0],
                     "seconds": round(time.monotonic() - t0, 1),
                     "notes": [line for line in proc.stdout.splitlines() if line.startswith(
                         ("SKIPPED", "XFAIL", "XPASS", "FAILED", "ERROR"))]})
    return runs


def aggregate(records: list[dict]) -> list[dict]:
    by_fault: dict[str, list[dict]] = {}
    for r in records:
        by_fault.setdefault(r["fault"], []).append(r)
    rows = []
    for fault in sorted(by_fault, key=lambda f: (ORDER.index(f) if f in ORDER else 99, f)):
        recs = by_fault[fault]
        secs = [r["seconds"] for r in recs if r.get("seconds") is not None]
        outcomes = [r.get("outcome", "recovered") for r in recs]
        outcome = "failed as designed" if "failed as designed" in outcomes else "recovered"
        lost = [r["lost"] for r in recs if r.get("lost") is not None]
        rows.append({
            "fault": fault, "runs": len(recs), "outcome": outcome,
            "ok": outcomes.count(outcome),
            "median_seconds": round(statistics.median(secs), 1) if secs else None,
            "max_seconds": round(max(secs), 1) if secs else None,
            "messages_lost": sum(lost) if lost else None,
        })
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| fault | runs | recovered | time to ready, median (max) | messages lost |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r["outcome"] == "recovered":
            recovered = f"{r['ok']}/{r['runs']}"
            when = f"{r['median_seconds']} s ({r['max_seconds']} s)" \
                if r["median_seconds"] is not None else "never (see Known problems)"
        else:
            recovered = f"no: marked failed, as designed ({r['ok']}/{r['runs']})"
            when = f"failed after {r['median_seconds']} s ({r['max_seconds']} s)"
        lost = "-" if r["messages_lost"] is None else str(r["messages_lost"])
        lines.append(f"| {r['fault']} | {r['runs']} | {recovered} | {when} | {lost} |")
    return "\n".join(lines)


def update_docs(text: str) -> None:
    doc = DOC.read_text()
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    if not rest:
        raise SystemExit(f"{DOC}: markers {BEGIN} / {END} not found")
    DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--slow", action="store_true", help="also five SIGKILLs per role")
    parser.add_argument("--from-log", type=Path, action="append",
                        help="aggregate existing JSON-lines logs instead of running (repeatable)")
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    runs = []
    if args.from_log:
        logs = args.from_log
    else:
        logs = [Path(tempfile.mkstemp(prefix="reliability-", suffix=".jsonl")[1])]
        runs = run_tests(args.rounds, args.slow, logs[0])
    records = [json.loads(line) for log in logs for line in log.read_text().splitlines()
               if line.strip()]
    rows = aggregate(records)
    result = {
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                 "python": platform.python_version()},
        "rounds": runs, "from_logs": [str(p) for p in args.from_log or []],
        "faults": rows, "records": records,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    text = table(rows)
    print(text)
    if args.update_docs:
        update_docs(text)
    return 0 if all(r["exit"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
