"""Proxy overhead per request: the same requests through the managed nginx proxy and straight
to the worker that serves them, alternating in batches within one run.

    .venv/bin/python bench/proxy_overhead.py [--requests 600]

Brings up a stack (main, a sync worker, a client reader, PostgreSQL, Redis, the proxy) with the
daemon, then times, over one keep-alive connection each:
  - GET /_matrix/client/versions   (client_reader)  proxy vs client-reader-1:8008
  - GET /_matrix/client/v3/sync?timeout=0 (sync, authenticated) proxy vs sync-1:8008
Writes bench/results/proxy-overhead.json (median, p99, overhead) with the machine it ran on.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.stackrun import StackRun, http_json  # noqa: E402


def timed(conn: http.client.HTTPConnection, path: str, headers: dict) -> float:
    t0 = time.perf_counter()
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{path}: HTTP {resp.status}")
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def measure(proxy: tuple[str, int], direct: tuple[str, int], path: str, headers: dict,
            requests: int, batch: int = 20) -> dict:
    via = http.client.HTTPConnection(*proxy, timeout=30)
    straight = http.client.HTTPConnection(*direct, timeout=30)
    for conn in (via, straight):  # warm up
        for _ in range(10):
            timed(conn, path, headers)
    times = {"proxy": [], "direct": []}
    while len(times["proxy"]) < requests:
        for name, conn in (("proxy", via), ("direct", straight)):
            times[name] += [timed(conn, path, headers) for _ in range(batch)]
    out = {}
    for name, values in times.items():
        out[name] = {"median_ms": round(statistics.median(values) * 1e3, 3),
                     "p99_ms": round(pct(values, 0.99) * 1e3, 3), "n": len(values)}
    out["overhead_median_ms"] = round(out["proxy"]["median_ms"] - out["direct"]["median_ms"], 3)
    out["overhead_p99_ms"] = round(out["proxy"]["p99_ms"] - out["direct"]["p99_ms"], 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=600)
    args = parser.parse_args()
    client = docker.from_env()
    name = f"ssbenchpx{uuid.uuid4().hex[:4]}"
    run = StackRun(Path(tempfile.mkdtemp(prefix="ssbench-")) / "stack", name,
                   {"sync": 1, "client_reader": 1}, client)
    load_before = os.getloadavg()
    try:
        run.start_daemon()
        run.wait_ready()
        pw = run.dir / "pw"
        pw.write_text("bench password 1234\n")
        run.ctl("register", "bench", "--password-file", str(pw))
        _, login = http_json("POST", f"{run.client_url}/_matrix/client/v3/login", {
            "type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bench"},
            "password": "bench password 1234"})
        auth = {"Authorization": f"Bearer {login['access_token']}"}
        proxy = ("127.0.0.1", run.client_port)
        results = {
            "versions (client_reader)": measure(proxy, (run.ip("client-reader-1"), 8008),
                                                "/_matrix/client/versions", {}, args.requests),
            "sync timeout=0 (sync)": measure(proxy, (run.ip("sync-1"), 8008),
                                             "/_matrix/client/v3/sync?timeout=0", auth,
                                             args.requests),
        }
        run.stop_daemon()
    finally:
        run.cleanup()
    report = {
        "what": "proxy overhead per request: nginx proxy vs straight to the worker, "
                "alternating batches of 20 on keep-alive connections",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                    "load_before": load_before, "load_after": os.getloadavg()},
        "results": results,
    }
    out = REPO / "bench" / "results" / "proxy-overhead.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    for path, r in results.items():
        print(f"{path}: proxy {r['proxy']['median_ms']} ms (p99 {r['proxy']['p99_ms']}), "
              f"direct {r['direct']['median_ms']} ms (p99 {r['direct']['p99_ms']}), "
              f"overhead {r['overhead_median_ms']} ms median")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
