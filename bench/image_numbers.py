#!/usr/bin/env python3
"""Measure the images: build times, sizes, time-to-health. Writes bench/results/image.json.

    .venv/bin/python bench/image_numbers.py [--uncached] [--runs N]

--uncached rebuilds everything from scratch (debootstrap, import, docker build --no-cache); the
images are replaced by equivalent ones. Without it only an idempotent (cached) rebuild is timed
and the last uncached numbers are kept.
Everything this script creates carries the label synapse-supervisor.bench=<id> and is removed.
Numbers from a shared machine are noisy: look at medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import docker

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "image.json"
IMAGES = {
    "base": "synapse-supervisor/debian:bookworm",
    "synapse": "synapse-supervisor/synapse:1.163.2",
    "postgres": "synapse-supervisor/postgres:15",
    "redis": "synapse-supervisor/redis:7",
}
LABEL = "synapse-supervisor.bench"
PASSWORD = "bench-password"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def run_build(env_extra: dict) -> dict:
    env = dict(os.environ, **env_extra)
    start = time.monotonic()
    proc = subprocess.run([str(REPO / "image" / "build")], env=env, capture_output=True, text=True)
    total = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit("image/build failed:\n" + proc.stderr[-2000:])
    per_image = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"built (\S+).*?([\d.]+) s$", line)
        if m:
            per_image[m.group(1)] = float(m.group(2))
    return {"seconds_total": round(total, 1), "seconds_per_image": per_image, "env": env_extra}


def http_ok(url: str) -> bool:
    try:
        with OPENER.open(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait(pred, container, timeout=120.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        container.reload()
        if container.status == "exited":
            raise RuntimeError(f"{container.name} exited:\n{container.logs(tail=30).decode()}")
        time.sleep(0.05)
    raise RuntimeError(f"{container.name}: timeout")


def host_port(container, port="8008/tcp") -> int:
    container.reload()
    return int(container.attrs["NetworkSettings"]["Ports"][port][0]["HostPort"])


def med(values):
    return round(statistics.median(values), 2) if values else None


def time_to_health(client, runs: int) -> dict:
    bench_id = uuid.uuid4().hex[:8]
    labels = {LABEL: bench_id}
    prefix = f"ssbench-{bench_id}"
    tmp = Path(tempfile.mkdtemp(prefix="ssbench-"))
    results: dict = {"runs": runs}
    try:
        net = client.networks.create(f"{prefix}-net", labels=labels)
        secrets = tmp / "secrets"
        secrets.mkdir()
        (secrets / "pg").write_text(PASSWORD)
        os.chown(secrets / "pg", 999, 999)
        data = tmp / "data"
        data.mkdir()
        (data / "homeserver.yaml").write_text(
            f"server_name: bench.local\nreport_stats: false\nsigning_key_path: /data/signing.key\n"
            f"trusted_key_servers: []\nsuppress_key_server_warning: true\nmacaroon_secret_key: m\n"
            f"database: {{name: psycopg2, args: {{user: synapse, password: {PASSWORD},"
            f" database: synapse, host: {prefix}-db, cp_min: 1, cp_max: 5}}}}\n"
            f"redis: {{enabled: true, host: {prefix}-redis}}\n"
        )
        for p in (data, data / "homeserver.yaml"):
            os.chown(p, 991, 991)
        client.containers.run(IMAGES["synapse"], command=["generate-keys"], remove=True,
                              network_mode="none", labels=labels,
                              volumes={str(data): {"bind": "/data", "mode": "rw"}})

        t0 = time.monotonic()
        db = client.containers.run(
            IMAGES["postgres"], name=f"{prefix}-db", detach=True, network=net.name, labels=labels,
            environment={"POSTGRES_USER": "synapse", "POSTGRES_PASSWORD_FILE": "/run/secrets/pg"},
            volumes={str(secrets): {"bind": "/run/secrets", "mode": "ro"}})
        wait(lambda: db.exec_run(["pg_isready", "-q", "-h", "127.0.0.1"]).exit_code == 0, db)
        results["postgres_ready_first_start_s"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        redis = client.containers.run(IMAGES["redis"], name=f"{prefix}-redis", detach=True,
                                      network=net.name, labels=labels)
        wait(lambda: redis.exec_run(["redis-cli", "ping"]).output.strip() == b"PONG", redis)
        results["redis_ready_s"] = round(time.monotonic() - t0, 2)

        main_kwargs = dict(
            name=f"{prefix}-main", hostname=f"{prefix}-main", detach=True, network=net.name,
            labels=labels, ports={"8008/tcp": ("127.0.0.1", None)},
            volumes={str(data): {"bind": "/data", "mode": "ro"}})
        main_times, stop_times = [], []
        main = None
        for i in range(runs):
            t0 = time.monotonic()
            main = client.containers.run(IMAGES["synapse"], **main_kwargs)
            url = f"http://127.0.0.1:{host_port(main)}/health"
            wait(lambda: http_ok(url), main)
            main_times.append(time.monotonic() - t0)
            if i < runs - 1:
                t0 = time.monotonic()
                main.stop(timeout=20)
                stop_times.append(time.monotonic() - t0)
                main.remove()
        results["main_start_to_health_empty_db_s"] = round(main_times[0], 2)
        results["main_start_to_health_existing_db_s"] = med(main_times[1:])
        results["main_start_to_health_all_s"] = [round(t, 2) for t in main_times]
        t0 = time.monotonic()
        state = {}

        def healthy():
            main.reload()
            state["h"] = main.attrs["State"].get("Health", {}).get("Status")
            return state["h"] == "healthy"

        wait(healthy, main, timeout=60)
        results["main_docker_health_healthy_s_after_http_ok"] = round(time.monotonic() - t0, 2)

        worker_health, worker_repl = [], []
        for i in range(runs):
            t0 = time.monotonic()
            w = client.containers.run(
                IMAGES["synapse"], name=f"{prefix}-sync-{i}", hostname=f"{prefix}-sync-{i}",
                detach=True, network=net.name, labels=labels,
                ports={"8008/tcp": ("127.0.0.1", None)},
                volumes={str(data): {"bind": "/data", "mode": "ro"}},
                environment={"SYNAPSE_WORKER": "synapse.app.synchrotron",
                             "SYNAPSE_WORKER_NAME": f"sync-{i}",
                             "SYNAPSE_REPLICATION_HOST": f"{prefix}-main"})
            url = f"http://127.0.0.1:{host_port(w)}/health"
            wait(lambda: http_ok(url), w)
            worker_health.append(time.monotonic() - t0)
            wait(lambda: b"REPLICATE successfully sent" in w.logs(), w)
            worker_repl.append(time.monotonic() - t0)
            t0 = time.monotonic()
            w.stop(timeout=20)
            stop_times.append(time.monotonic() - t0)
            w.reload()
            assert w.attrs["State"]["ExitCode"] == 0
            w.remove()
        results["worker_start_to_health_s"] = med(worker_health)
        results["worker_start_to_replicating_s"] = med(worker_repl)
        results["worker_all_s"] = [round(t, 2) for t in worker_health]
        t0 = time.monotonic()
        main.stop(timeout=20)
        stop_times.append(time.monotonic() - t0)
        results["synapse_docker_stop_s"] = med(stop_times)
        t0 = time.monotonic()
        db.stop(timeout=20)
        results["postgres_docker_stop_s"] = round(time.monotonic() - t0, 2)
        db.reload()
        results["postgres_exit_code"] = db.attrs["State"]["ExitCode"]
    finally:
        flt = {"label": f"{LABEL}={bench_id}"}
        for c in client.containers.list(all=True, filters=flt):
            c.remove(force=True, v=True)
        for n in client.networks.list(filters=flt):
            n.remove()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uncached", action="store_true", help="rebuild without the layer cache")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    subprocess.run([str(REPO / "scripts" / "ensure-docker")], check=True)
    client = docker.from_env(timeout=300)

    previous = json.loads(OUT.read_text()) if OUT.exists() else {}
    build = {"cached": run_build({})}
    if args.uncached:
        # from scratch: debootstrap (the cached rootfs is a cache), import, builds without cache
        (REPO / "image" / ".cache" / "debian-bookworm-rootfs.tar").unlink(missing_ok=True)
        build["uncached"] = run_build({"NO_CACHE": "1", "REBUILD_BASE": "1"})
    elif "uncached" in previous.get("build", {}):
        build["uncached"] = previous["build"]["uncached"]  # keep the last uncached measurement
    sizes = {}
    for key, name in IMAGES.items():
        img = client.images.get(name)
        sizes[name] = {"bytes": img.attrs["Size"], "mb": round(img.attrs["Size"] / 1e6, 1)}
    result = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "docker": client.version().get("Version"),
                    "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
        "build": build,
        "image_sizes": sizes,
        "time_to_health": time_to_health(client, args.runs),
        "notes": [
            "seconds, wall clock, noisy shared machine; medians over --runs",
            "uncached synapse/postgres/redis builds download from the Debian mirror and PyPI",
            "first main start includes creating the schema on an empty database",
            "Docker's health status lags /health by up to the 15 s HEALTHCHECK interval",
        ],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
