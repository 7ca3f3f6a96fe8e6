#!/usr/bin/env python3
"""Side-by-side benchmarks of synapse-supervisor against the ways operators do it today.

Run through bench/run (which installs docker-compose, matplotlib and the images). Sections:

  start   cold start to all ready of the default stack (what `synapsectl init` writes), real
          Synapse; per round, in rotating order: the daemon, one container at a time
          (systemd-style), docker-compose 1.29 with service_healthy, the critical path
          (each container alone). Also the very first start on an empty database, once.
          The ordered stop is measured in the same rounds (daemon SIGTERM vs each container's
          `docker stop` alone).
  cost    the daemon's RSS and CPU while idle, and `synapsectl status` latency.
  crash   `docker kill` of a worker: the daemon's restart vs Docker's restart policy.
  scale   ORCHESTRATION ONLY: the stub image with 50/100/200 workers, the daemon vs a bare
          docker-py thread pool.

Every ratio is computed inside one run, round by round (methods alternate), never across runs.
Everything created carries the label synapse-supervisor.stack=ssbench-<id>[...] and is removed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402
from benchlib import BENCH_LABEL, INSTANCE_LABEL, STACK_LABEL, BenchError, log  # noqa: E402
from supervisor import lifecycle  # noqa: E402
from supervisor.containers import NOTIFY_DIR  # noqa: E402
from supervisor.prepare import prepare  # noqa: E402

RESULTS = bl.REPO / "bench" / "results"
STUB_IMAGE = "synapse-supervisor/stub:1"
CRASH_TARGET = "client-reader-1"
SETTLE = 11.0  # s a restarted container runs before the next kill (Docker resets its backoff
# after 10 s of running; the bench stack sets restart.stable_after: 10 to match)
SYNAPSE_HEALTHCHECK = {  # Synapse's contrib/docker recipe timings, with the image's own check
    "test": ["CMD", "/opt/synapse/bin/python", "/usr/local/bin/synapse-healthcheck"],
    "interval": "15s", "timeout": "5s", "retries": 3, "start_period": "5s"}


def rnd(v, d=3):
    return None if v is None else round(v, d)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.client = docker.from_env(timeout=300, max_pool_size=64)
        self.run_id = uuid.uuid4().hex[:6]
        self.base = f"ssbench-{self.run_id}"
        self.compose_stack = f"{self.base}-compose"
        self.compose_project = f"ssbench{self.run_id}cmp"
        self.work = Path(args.workdir or f"/var/tmp/{self.base}")
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.events = bl.Events(self.client, self.base)
        self.stack_file: Path | None = None
        self.daemon: bl.Daemon | None = None
        self.init_daemon: bl.Daemon | None = None
        self.prepared = None
        self.compose_file = self.work / "docker-compose.yml"
        self.results: dict = {}

    # --- helpers ---------------------------------------------------------------------------

    def ids(self, stack: str | None = None) -> dict[str, str]:
        return bl.stack_containers(self.client, stack or self.base)

    def start_order(self) -> list[str]:
        return [m for tier in self.prepared.plan.start for m in tier.members]

    def ready_check(self, inst: str, ip: str, strict: bool):
        if inst == "postgres":
            pg = self.prepared.stack.postgres
            return lambda: bl.postgres_accepts(ip, pg.user, pg.database)
        if inst == "redis":
            return lambda: bl.redis_answers(ip)
        return (lambda: bl.synapse_ready(ip)) if strict else (lambda: bl.health(ip))

    def start_one(self, inst: str, strict: bool, cid: str | None = None) -> dict:
        """docker start one container and poll its readiness every 0.1 s."""
        cid = cid or self.ids()[inst]
        ts = time.time()
        self.client.api.start(cid)
        ip = bl.container_ip(self.client, cid)
        tr = bl.poll(self.ready_check(inst, ip, strict), 180, inst,
                     alive=lambda: bl.is_running(self.client, cid))
        return {"instance": inst, "start": ts, "ready": tr, "seconds": tr - ts}

    def stop_all(self) -> None:
        """Bring every container of this bench to a stop (workers first)."""
        for d in (self.daemon, self.init_daemon):
            if d is not None and d.proc is not None:
                d.kill()
        running = [c for c in self.client.api.containers(filters={"label": STACK_LABEL})
                   if (c.get("Labels") or {}).get(STACK_LABEL, "").startswith(self.base)]
        rank = {"postgres": 2, "redis": 2, "main": 1}
        running.sort(key=lambda c: rank.get((c.get("Labels") or {}).get(INSTANCE_LABEL), 0))
        for c in running:
            try:
                self.client.api.stop(c["Id"], timeout=10)
            except docker.errors.APIError:
                pass

    def assert_stopped(self) -> None:
        left = bl.running_of(self.client, self.base)
        if left:
            raise BenchError(f"not the same starting point: still running {left}")

    # --- setup -------------------------------------------------------------------------------

    def init_main_stack(self) -> None:
        edits = {"restart.stable_after": 10, "daemon.control_socket": "<stack dir>/control.sock"}
        has_proxy = []

        def edit(data: dict) -> None:
            # Match Docker's own rule (restart backoff resets after 10 s of running), so that
            # every kill in the crash section is a first crash after a stable run.
            data["restart"]["stable_after"] = 10
            # The compared stack is the nine containers (PostgreSQL, Redis, main, six
            # workers); `synapsectl init` now adds an nginx proxy: measured on its own stack.
            if (data.get("proxy") or {}).get("mode", "none") != "none":
                has_proxy.append(True)
                data["proxy"]["mode"] = "none"
                edits["proxy.mode"] = "none"

        self.stack_file = bl.init_stack(self.work / "stack", self.base, edit)
        self.prepared = prepare(self.stack_file)
        self.daemon = bl.Daemon(self.stack_file, self.logs)
        st = self.prepared.stack
        self.results["stack"] = {
            "name": st.name, "instances": [i.name for i in st.instances],
            "workers": [w.type for w in st.workers], "images": dataclasses.asdict(st.images),
            "start_tiers": [list(t.members) for t in self.prepared.plan.start],
            "stop_tiers": [list(t.members) for t in self.prepared.plan.stop],
            "bench_edits": edits}
        if has_proxy:
            # The stack exactly as `synapsectl init` writes it (with its proxy): our start only.
            name = f"{self.base}-init"
            self.init_file = bl.init_stack(self.work / "stack-init", name)
            self.init_prepared = prepare(self.init_file)
            self.init_daemon = bl.Daemon(self.init_file, self.logs)
            self.results["stack_as_init"] = {
                "name": name, "instances": list(bl.stack_specs(self.init_file, self.client)),
                "start_tiers": [list(t.members) for t in self.init_prepared.plan.start]}

    # --- a: the daemon ---------------------------------------------------------------------

    def run_ours_as_init(self) -> dict:
        """The daemon on the stack exactly as `synapsectl init` writes it (with the proxy)."""
        saved = self.daemon, self.prepared
        self.daemon, self.prepared = self.init_daemon, self.init_prepared
        try:
            return self.run_ours()
        finally:
            self.daemon, self.prepared = saved

    def run_ours(self, stop: bool = True) -> dict:
        d = self.daemon
        t0 = d.start()
        t_ready, status = d.wait_ready()
        evs = d.events()
        res = {"seconds": t_ready - t0, "t0": t0, "poll": "GET /v1/status every 0.1 s "
               "(what synapsectl status --json prints)"}
        ready_ev = next((e for e in evs if e["event"] == "stack_ready"), None)
        res["stack_ready_log_seconds"] = ready_ev["seconds"] if ready_ev else None
        res["tier_ready_seconds"] = {e["tier"]: e["seconds"] for e in evs
                                     if e["event"] == "tier_ready"}
        first = next((e["t"] for e in evs if e["event"] == "daemon_starting"), None)
        first_start = next((e["t"] for e in evs if e["event"] == "starting"), None)
        res["daemon_boot_seconds"] = rnd(first - t0) if first else None
        res["popen_to_first_start_call_seconds"] = rnd(first_start - t0) if first_start else None
        res["log_ready_to_status_ready_seconds"] = rnd(t_ready - ready_ev["t"]) if ready_ev \
            else None
        starts = {e["instance"]: e["t"] for e in evs if e["event"] == "starting"}
        readies = {e["instance"]: e["t"] for e in evs if e["event"] == "ready"}
        res["containers"] = [{"instance": i, "start": rnd(starts[i] - t0),
                              "ready": rnd(readies[i] - t0)}
                             for i in self.start_order() if i in starts and i in readies]
        res["created"] = sum(1 for e in evs if e["event"] == "created")
        res["ready_total"] = f"{status['ready']}/{status['total']}"
        if stop:
            res["stop"] = self.stop_ours()
        res["seconds"] = rnd(res["seconds"])
        return res

    def stop_ours(self) -> dict:
        d = self.daemon
        t_sig, t_exit, code = d.stop()
        evs = d.events()
        stopped = next((e for e in evs if e["event"] == "stack_stopped"), None)
        tiers = {}
        for e in evs:
            if e["event"] == "tier_stopping":
                tiers[e["tier"]] = e["t"]
            elif e["event"] == "tier_stopped" and e["tier"] in tiers:
                tiers[e["tier"]] = rnd(e["t"] - tiers[e["tier"]])
        sig = next((e["t"] for e in evs if e["event"] == "signal"), None)
        exit_ev = next((e["t"] for e in evs if e["event"] == "daemon_exit"), None)
        return {"sigterm_to_exit_seconds": rnd(t_exit - t_sig), "exit_code": code,
                "stack_stopped_log_seconds": stopped["seconds"] if stopped else None,
                "tier_seconds": tiers,
                # where the time goes: signal handled .. stack_stopped .. daemon_exit .. exit
                "sigterm_to_signal_log": rnd(sig - t_sig) if sig else None,
                "stack_stopped_to_daemon_exit_log": rnd(exit_ev - stopped["t"])
                if exit_ev and stopped else None,
                "daemon_exit_log_to_process_exit": rnd(t_exit - exit_ev) if exit_ev else None}

    # --- b: one at a time (systemd-style) ----------------------------------------------------

    def run_sequential(self) -> dict:
        ids = self.ids()
        t0 = time.time()
        rows = [self.start_one(inst, strict=False, cid=ids[inst]) for inst in self.start_order()]
        total = rows[-1]["ready"] - t0
        # The same containers' stops, each alone, in the daemon's stop order.
        stops = {}
        for tier in self.prepared.plan.stop:
            for inst in tier.members:
                ts = time.time()
                self.client.api.stop(ids[inst], timeout=int(self.prepared.stack.restart
                                                             .stop_timeout))
                stops[inst] = rnd(time.time() - ts)
        tier_max = {t.name: max(stops[m] for m in t.members) for t in self.prepared.plan.stop}
        return {"seconds": rnd(total), "t0": t0, "ready_signal": "PostgreSQL accepts, Redis "
                "PING, Synapse /health 200 (polled every 0.1 s)",
                "containers": [{"instance": r["instance"], "start": rnd(r["start"] - t0),
                                "ready": rnd(r["ready"] - t0)} for r in rows],
                "stop_alone_seconds": stops, "stop_tier_max_seconds": tier_max,
                "stop_sum_of_tier_max_seconds": rnd(sum(tier_max.values()))}

    # --- c: docker-compose with service_healthy ----------------------------------------------

    def write_compose(self) -> None:
        sp = bl.stack_specs(self.stack_file, self.client)
        deps = lifecycle.dependencies(self.prepared.stack)
        services, volumes = {}, {}
        for inst, spec in sp.items():
            mounts = []
            for m in spec.mounts:
                if m.target == NOTIFY_DIR:
                    continue  # nobody listens for sd_notify under compose
                if m.kind == "volume":
                    volumes[m.source] = {"external": True}
                mounts.append(f"{m.source}:{m.target}" + (":ro" if m.read_only else ""))
            svc = {
                "image": spec.image,
                "container_name": f"{self.compose_stack}-{inst}",
                "labels": {STACK_LABEL: self.compose_stack, INSTANCE_LABEL: inst,
                           BENCH_LABEL: self.run_id},
                "environment": {k: v for k, v in spec.env.items() if k != "NOTIFY_SOCKET"},
                "volumes": mounts,
                "networks": {"default": {"aliases": [inst]}},
                "stop_signal": spec.stop_signal,
                "stop_grace_period": f"{int(spec.stop_timeout)}s",
            }
            if spec.user:
                svc["user"] = spec.user
            if spec.read_only:
                svc["read_only"] = True
            if spec.tmpfs:
                svc["tmpfs"] = [f"{k}:{v}" for k, v in spec.tmpfs.items()]
            if spec.cap_drop:
                svc["cap_drop"] = list(spec.cap_drop)
            if spec.security_opt:
                svc["security_opt"] = list(spec.security_opt)
            if spec.ports:
                svc["ports"] = [f"{ip}:{port}:{cport.split('/')[0]}"
                                for cport, (ip, port) in spec.ports.items()]
            if spec.synapse:
                svc["healthcheck"] = dict(SYNAPSE_HEALTHCHECK)
            # PostgreSQL and Redis: the images' own HEALTHCHECKs (every 5 s).
            if deps[inst]:
                svc["depends_on"] = {d: {"condition": "service_healthy"} for d in deps[inst]}
            services[inst] = svc
        doc = {"version": "2.4", "services": services,
               "networks": {"default": {"labels": {STACK_LABEL: self.compose_stack,
                                                   BENCH_LABEL: self.run_id}}},
               "volumes": volumes}
        header = ("# Generated by bench/sidebyside.py from the daemon's rendered configs "
                  "(<stack dir>/.state/conf).\n")
        self.compose_file.write_text(header + yaml.safe_dump(doc, sort_keys=False))

    def compose(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(["docker-compose", "-p", self.compose_project, "-f",
                               str(self.compose_file), *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BenchError(f"docker-compose {' '.join(args)} failed: {proc.stderr[-2000:]}")
        return proc

    def run_compose(self) -> dict:
        names = list(self.prepared.plan.start)
        insts = [m for t in names for m in t.members]
        t0 = time.time()
        self.compose("up", "-d")
        t_up = time.time()
        healthy, starts = {}, {}
        for inst in insts:
            ev = self.events.wait(lambda e, i=inst: e.stack == self.compose_stack and
                                  e.instance == i and e.t >= t0 and
                                  e.action == "health_status: healthy", 300)
            healthy[inst] = ev.t
        for inst in insts:
            ev = self.events.wait(lambda e, i=inst: e.stack == self.compose_stack and
                                  e.instance == i and e.t >= t0 and e.action == "start", 10)
            starts[inst] = ev.t
        total = max(healthy.values()) - t0
        ts = time.time()
        self.compose("stop")
        return {"seconds": rnd(total), "t0": t0, "up_returned_seconds": rnd(t_up - t0),
                "ready_signal": "Docker health status healthy (healthcheck every 15 s, "
                "start_period 5 s; PostgreSQL/Redis: the images' 5 s checks)",
                "containers": [{"instance": i, "start": rnd(starts[i] - t0),
                                "ready": rnd(healthy[i] - t0)} for i in insts],
                "compose_stop_seconds": rnd(time.time() - ts)}

    # --- d: the critical path, each container alone --------------------------------------------

    def run_critical(self) -> dict:
        ids = self.ids()
        alone = {}
        for inst in ("postgres", "redis", "main"):
            alone[inst] = self.start_one(inst, strict=True, cid=ids[inst])["seconds"]
        workers = [w.name for w in self.prepared.stack.workers]
        for inst in workers:
            alone[inst] = self.start_one(inst, strict=True, cid=ids[inst])["seconds"]
            self.client.api.stop(ids[inst], timeout=10)
        for inst in ("main", "redis", "postgres"):
            self.client.api.stop(ids[inst], timeout=10)
        infra = max(alone["postgres"], alone["redis"])
        slowest = max(workers, key=lambda w: alone[w])
        total = infra + alone["main"] + alone[slowest]
        return {"seconds": rnd(total), "alone_seconds": {k: rnd(v) for k, v in alone.items()},
                "slowest_worker": slowest, "ready_signal": "the daemon's: PostgreSQL accepts, "
                "Redis PING, Synapse /health 200 and replication metric >= 1"}

    # --- section: cold start -------------------------------------------------------------------

    def section_start(self) -> None:
        out = self.results.setdefault("cold_start", {})
        log("first start on an empty database (the daemon creates containers, initdb, schema)")
        self.assert_stopped()
        out["first_start_empty_db"] = self.run_ours()
        log(f"  ready after {out['first_start_empty_db']['seconds']} s")
        if self.init_daemon is not None:
            log("first start of the stack as `synapsectl init` writes it (with the proxy)")
            out["first_start_empty_db_as_init"] = self.run_ours_as_init()
            log(f"  ready after {out['first_start_empty_db_as_init']['seconds']} s")
        self.write_compose()
        log("docker-compose: first up (creates its containers; same database)")
        out["compose_first_up"] = self.run_compose()
        log(f"  healthy after {out['compose_first_up']['seconds']} s")
        methods = {"ours": self.run_ours, "sequential": self.run_sequential,
                   "compose": self.run_compose, "critical_path": self.run_critical}
        if self.init_daemon is not None:
            methods["ours_as_init"] = self.run_ours_as_init
        keys = list(methods)
        rounds = out.setdefault("rounds", [])
        for r in range(self.args.rounds):
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            rnd_res = {"round": r + 1, "order": order}
            for key in order:
                self.assert_stopped()
                log(f"round {r + 1}/{self.args.rounds}: {key}")
                rnd_res[key] = methods[key]()
                log(f"  {rnd_res[key]['seconds']} s")
            o = rnd_res["ours"]["seconds"]
            rnd_res["ratios"] = {f"ours_over_{k}": rnd(o / rnd_res[k]["seconds"])
                                 for k in ("sequential", "compose", "critical_path")}
            rnd_res["ratios"]["ours_stop_over_sum_of_tier_max"] = rnd(
                rnd_res["ours"]["stop"]["sigterm_to_exit_seconds"] /
                rnd_res["sequential"]["stop_sum_of_tier_max_seconds"])
            rounds.append(rnd_res)
            self.save_partial()
        self.compose("down")  # its containers and network; the volumes are the stack's
        out["summary"] = self.summarise_start(rounds)

    def summarise_start(self, rounds: list[dict]) -> dict:
        s = {k: bl.summary([r[k]["seconds"] for r in rounds])
             for k in ("ours", "sequential", "compose", "critical_path", "ours_as_init")
             if k in rounds[0]}
        if "ours_as_init" in rounds[0]:
            s["ours_as_init_proxy_tier"] = bl.summary(
                [r["ours_as_init"]["tier_ready_seconds"].get("proxy") for r in rounds])
        s["ours_stack_ready_log"] = bl.summary([r["ours"]["stack_ready_log_seconds"]
                                                for r in rounds])
        s["compose_up_returned"] = bl.summary([r["compose"]["up_returned_seconds"]
                                               for r in rounds])
        s["ratios"] = {k: bl.summary([r["ratios"][k] for r in rounds])
                       for k in rounds[0]["ratios"]}
        s["stop"] = {
            "ours_sigterm_to_exit": bl.summary([r["ours"]["stop"]["sigterm_to_exit_seconds"]
                                                for r in rounds]),
            "ours_stack_stopped_log": bl.summary([r["ours"]["stop"]["stack_stopped_log_seconds"]
                                                  for r in rounds]),
            "sum_of_tier_max_docker_stop": bl.summary(
                [r["sequential"]["stop_sum_of_tier_max_seconds"] for r in rounds]),
            "compose_stop": bl.summary([r["compose"]["compose_stop_seconds"] for r in rounds])}
        # The round whose daemon time is the median one, for the timeline plot.
        ordered = sorted(rounds, key=lambda r: r["ours"]["seconds"])
        s["timeline_round"] = ordered[len(ordered) // 2]["round"]
        return s

    # --- section: daemon cost --------------------------------------------------------------------

    def section_cost(self) -> None:
        out = self.results.setdefault("cost", {})
        self.assert_stopped()
        d = self.daemon
        self.run_ours(stop=False)
        pid = d.pid
        tck = os.sysconf("SC_CLK_TCK")

        def sample() -> dict:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            status = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in
                      Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line}
            return {"t": time.time(), "cpu_ticks": int(fields[11]) + int(fields[12]),
                    "threads": int(fields[17]),
                    "rss_mib": round(int(status["VmRSS"].split()[0]) / 1024, 1),
                    "hwm_mib": round(int(status["VmHWM"].split()[0]) / 1024, 1)}

        log(f"daemon idle for {self.args.idle} s (sampling /proc/{pid} every 10 s)")
        samples = [sample()]
        t_end = samples[0]["t"] + self.args.idle
        while time.time() < t_end:
            time.sleep(min(10.0, max(0.0, t_end - time.time())))
            samples.append(sample())
        span = samples[-1]["t"] - samples[0]["t"]
        ticks = samples[-1]["cpu_ticks"] - samples[0]["cpu_ticks"]
        per = [100 * (b["cpu_ticks"] - a["cpu_ticks"]) / tck / (b["t"] - a["t"])
               for a, b in zip(samples, samples[1:])]
        out["idle"] = {
            "seconds": round(span), "containers": len(self.ids()),
            "cpu_percent_of_one_core": rnd(100 * ticks / tck / span, 3),
            "cpu_seconds": rnd(ticks / tck, 2),
            "cpu_percent_per_10s": bl.summary(per, 2),
            "rss_mib": bl.summary([s["rss_mib"] for s in samples], 1),
            "peak_rss_mib_since_start": samples[-1]["hwm_mib"],
            "threads": samples[-1]["threads"],
            "samples": [{k: (round(v - samples[0]["t"], 1) if k == "t" else v)
                         for k, v in s.items()} for s in samples]}
        log(f"  CPU {out['idle']['cpu_percent_of_one_core']} % of a core, RSS "
            f"{out['idle']['rss_mib']['median']} MiB")
        n = self.args.status_calls
        log(f"synapsectl status --json x{n}, then GET /v1/status x{n}")
        cli = []
        for _ in range(n):
            ts = time.perf_counter()
            proc = subprocess.run([*bl.SYNAPSECTL, "status", "--json", "--stack",
                                   str(self.stack_file)], capture_output=True, env=bl.ENV)
            cli.append(time.perf_counter() - ts)
            if proc.returncode != 0:
                raise BenchError(f"synapsectl status failed: {proc.stderr[-500:]}")
        api = []
        for _ in range(n):
            ts = time.perf_counter()
            if d.status() is None:
                raise BenchError("GET /v1/status failed")
            api.append(time.perf_counter() - ts)
        out["status_latency"] = {
            "containers": len(self.ids()),
            "synapsectl_status_json_seconds": {k: v for k, v in bl.summary(cli, 4).items()
                                               if k != "values"},
            "api_v1_status_seconds": {k: v for k, v in bl.summary(api, 5).items()
                                      if k != "values"}}
        # Where a CLI call's time goes: the interpreter alone, and importing the CLI.
        for key, code in (("python_startup_seconds", "pass"),
                          ("python_import_cli_seconds", "import supervisor.cli")):
            vals = []
            for _ in range(20):
                ts = time.perf_counter()
                subprocess.run([bl.PYTHON, "-P", "-c", code], env=bl.ENV, check=True)
                vals.append(time.perf_counter() - ts)
            out["status_latency"][key] = rnd(statistics.median(vals), 4)
        out["after_status_calls"] = {"rss_mib": sample()["rss_mib"]}
        log(f"  CLI median {out['status_latency']['synapsectl_status_json_seconds']['median']} s")
        # the daemon keeps running: the crash section starts with it

    # --- section: crash to restart --------------------------------------------------------------

    def wait_log(self, pred, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.daemon.events():
                if pred(e):
                    return e
            if time.monotonic() > deadline:
                raise BenchError("timed out waiting for a daemon log event\n"
                                 + self.daemon.tail())
            time.sleep(0.2)

    def after_die(self, cid_pred, t_kill: float) -> tuple:
        die = self.events.wait(lambda e: e.action == "die" and cid_pred(e) and
                               e.t >= t_kill - 0.5, 60)
        start = self.events.wait(lambda e: e.action == "start" and cid_pred(e) and
                                 e.t > die.t, 120)
        ip = bl.container_ip(self.client, start.container_id)
        t_health = bl.poll(lambda: bl.health(ip), 120, "health after restart")
        t_repl = bl.poll(lambda: bl.synapse_ready(ip), 120, "replication after restart")
        return die, start, t_health, t_repl

    def crash(self, cid: str, how: str = "host") -> float:
        """SIGKILL the container's main process. "host": kill(2) on its host pid -- a crash
        Docker did not ask for, like the OOM killer. "docker": `docker kill`, which Docker
        counts as a manual stop: its restart policy then does not restart the container."""
        pid = self.client.api.inspect_container(cid)["State"]["Pid"]
        t = time.time()
        if how == "docker":
            self.client.api.kill(cid)
        else:
            os.kill(pid, 9)
        return t

    def docker_kill_probe(self, cid_pred, cid: str, wait: float = 15.0) -> dict:
        """One `docker kill`: was the container started again within `wait` s?"""
        t_kill = self.crash(cid, "docker")
        die = self.events.wait(lambda e: e.action == "die" and cid_pred(e) and
                               e.t >= t_kill - 0.5, 60)
        try:
            start = self.events.wait(lambda e: e.action == "start" and cid_pred(e) and
                                     e.t > die.t, wait)
            return {"restarted": True, "die_to_start_event": rnd(start.t - die.t)}
        except BenchError:
            return {"restarted": False, "waited_seconds": wait}

    def crash_ours(self, kills: int, probe: bool = False) -> list[dict]:
        rows = []
        if self.daemon.proc is None:
            self.run_ours(stop=False)
        for k in range(kills):
            rd = self.wait_log(lambda e: e["event"] == "ready" and e["instance"] == CRASH_TARGET,
                               120) if not rows else None
            last_ready = rows[-1]["_ready_t"] if rows else rd["t"]
            time.sleep(max(0.0, last_ready + SETTLE - time.time()))
            cid = self.ids()[CRASH_TARGET]
            t_kill = self.crash(cid)
            die, start, t_health, t_repl = self.after_die(
                lambda e: e.stack == self.base and e.instance == CRASH_TARGET, t_kill)
            starting = self.wait_log(lambda e: e["event"] == "starting" and
                                     e["instance"] == CRASH_TARGET and e["t"] > die.t, 60)
            ready = self.wait_log(lambda e: e["event"] == "ready" and
                                  e["instance"] == CRASH_TARGET and e["t"] > die.t, 120)
            backoff = next((e for e in self.daemon.events() if e["event"] == "backoff" and
                            e["instance"] == CRASH_TARGET and e["t"] > die.t), None)
            rows.append({"kill_to_die": rnd(die.t - t_kill), "exit_code": die.exit_code,
                         "die_to_start_call": rnd(starting["t"] - die.t),
                         "die_to_start_event": rnd(start.t - die.t),
                         "die_to_health": rnd(t_health - die.t),
                         "die_to_ready": rnd(ready["t"] - die.t),
                         "die_to_replication_probe": rnd(t_repl - die.t),
                         "backoff_seconds": backoff.get("seconds") if backoff else None,
                         "_ready_t": max(ready["t"], t_repl)})
            log(f"  ours kill {k + 1}/{kills}: die->start {rows[-1]['die_to_start_event']} s, "
                f"die->ready {rows[-1]['die_to_ready']} s")
        if probe:
            time.sleep(max(0.0, rows[-1]["_ready_t"] + SETTLE - time.time()))
            self.kill_probe["ours"] = self.docker_kill_probe(
                lambda e: e.stack == self.base and e.instance == CRASH_TARGET,
                self.ids()[CRASH_TARGET])
            self.wait_log(lambda e: e["event"] == "ready" and e["instance"] == CRASH_TARGET and
                          e["t"] > time.time() - 60 and e["t"] > rows[-1]["_ready_t"], 120)
        return rows

    def crash_docker(self, kills: int, probe: bool = False) -> list[dict]:
        if self.daemon.proc is not None:
            self.stop_ours()
        self.assert_stopped()
        ids = self.ids()
        for inst in ("postgres", "redis", "main"):
            self.start_one(inst, strict=True, cid=ids[inst])
        spec = bl.stack_specs(self.stack_file, self.client)[CRASH_TARGET]
        copy = dataclasses.replace(
            spec, name=f"{self.base}-always-{CRASH_TARGET}",
            labels={STACK_LABEL: self.base, INSTANCE_LABEL: f"always-{CRASH_TARGET}",
                    BENCH_LABEL: self.run_id})
        cid = bl.create_from_spec(self.client, copy, restart_policy="always")
        rows = []
        try:
            self.client.api.start(cid)
            ip = bl.container_ip(self.client, cid)
            bl.poll(lambda: bl.synapse_ready(ip), 120, "always-copy ready")
            last_start = self.events.wait(lambda e: e.container_id == cid and
                                          e.action == "start", 10).t
            for k in range(kills):
                time.sleep(max(0.0, last_start + SETTLE - time.time()))
                t_kill = self.crash(cid)
                die, start, t_health, t_repl = self.after_die(
                    lambda e: e.container_id == cid, t_kill)
                last_start = start.t
                rows.append({"kill_to_die": rnd(die.t - t_kill), "exit_code": die.exit_code,
                             "die_to_start_event": rnd(start.t - die.t),
                             "die_to_health": rnd(t_health - die.t),
                             "die_to_ready": rnd(t_repl - die.t),
                             "die_to_replication_probe": rnd(t_repl - die.t)})
                log(f"  docker kill {k + 1}/{kills}: die->start {rows[-1]['die_to_start_event']}"
                    f" s, die->ready {rows[-1]['die_to_ready']} s")
            restarts = self.client.api.inspect_container(cid)["RestartCount"]
            if probe:
                time.sleep(max(0.0, last_start + SETTLE - time.time()))
                self.kill_probe["docker_restart_always"] = self.docker_kill_probe(
                    lambda e: e.container_id == cid, cid)
            for r in rows:
                r["docker_restart_count_at_end"] = restarts
        finally:
            self.client.api.remove_container(cid, force=True)
            for inst in ("main", "redis", "postgres"):
                self.client.api.stop(ids[inst], timeout=10)
        return rows

    def section_crash(self) -> None:
        out = self.results.setdefault("crash", {"target": CRASH_TARGET, "ours": [],
                                                "docker_restart_always": [], "blocks": []})
        per_block = max(1, self.args.kills // self.args.crash_blocks)
        self.kill_probe = out.setdefault("docker_kill_once", {})
        for b in range(self.args.crash_blocks):
            for method in ("ours", "docker_restart_always"):
                log(f"crash block {b + 1}/{self.args.crash_blocks}: {method}, {per_block} kills")
                fn = self.crash_ours if method == "ours" else self.crash_docker
                rows = fn(per_block, probe=b == self.args.crash_blocks - 1)
                out[method] += rows
                out["blocks"].append({"block": b + 1, "method": method, "kills": len(rows)})
                self.save_partial()
        if self.daemon.proc is not None:
            out["stop_after_crash_block"] = self.stop_ours()
        for method in ("ours", "docker_restart_always"):
            for r in out[method]:
                r.pop("_ready_t", None)
        keys = ("die_to_start_call", "die_to_start_event", "die_to_health", "die_to_ready")
        out["summary"] = {m: {k: {kk: vv for kk, vv in bl.summary([r.get(k) for r in
                                                                     out[m]]).items()
                                  if kk != "values"}
                              for k in keys if any(k in r for r in out[m])}
                          for m in ("ours", "docker_restart_always")}
        out["settle_seconds"] = SETTLE
        out["how"] = ("SIGKILL to the container's main process from the host (a crash Docker "
                      "did not ask for); docker_kill_once: one `docker kill` each, which Docker "
                      "treats as a manual stop")

    # --- section: scale (orchestration only) -----------------------------------------------------

    def bare_start(self, bare: dict, ids: dict[str, str], create: bool) -> dict:
        client = self.client
        health_pool = ThreadPoolExecutor(max_workers=len(bare) + 4, thread_name_prefix="hp")
        t0 = time.time()

        def one(inst: str, spec) -> object:
            cid = bl.create_from_spec(client, spec) if create else ids[inst]
            ids[inst] = cid
            client.api.start(cid)
            ip = bl.container_ip(client, cid)
            return health_pool.submit(bl.poll, lambda: bl.health(ip), 300, inst)

        with ThreadPoolExecutor(max_workers=32, thread_name_prefix="bare") as pool:
            futs = [pool.submit(one, i, s) for i, s in bare.items()]
            hfuts = [f.result() for f in futs]
        t_start_calls = time.time()
        readies = [h.result() for h in hfuts]
        health_pool.shutdown()
        total = max(readies) - t0
        ts = time.time()
        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(lambda c: client.api.stop(c, timeout=10), list(ids.values())))
        return {"seconds": rnd(total), "start_calls_done_seconds": rnd(t_start_calls - t0),
                "containers": len(bare), "stop_seconds": rnd(time.time() - ts)}

    def scale_one(self, n: int) -> dict:
        name = f"{self.base}-s{n}"

        def edit(data: dict) -> None:
            data["images"]["synapse"] = STUB_IMAGE
            data["workers"] = {"client_reader": n}
            data["postgres"].update(max_connections=n + 60, cp_max=1, cp_min=1)
            if "proxy" in data:
                data["proxy"]["mode"] = "none"  # orchestration of Synapse processes only

        stack_file = bl.init_stack(self.work / name, name, edit)
        daemon = bl.Daemon(stack_file, self.logs)
        sp = bl.stack_specs(stack_file, self.client)
        bare_stack = f"{name}-bare"
        net = self.client.api.create_network(f"{name}-bare-net", driver="bridge", labels={
            STACK_LABEL: bare_stack, BENCH_LABEL: self.run_id})
        bare = {}
        for inst, spec in sp.items():
            if not spec.synapse:
                continue
            bare[inst] = dataclasses.replace(
                spec, name=f"{bare_stack}-{inst}", network=f"{name}-bare-net", ports={},
                env={k: v for k, v in spec.env.items() if k != "NOTIFY_SOCKET"},
                mounts=tuple(m for m in spec.mounts if m.target != NOTIFY_DIR),
                labels={STACK_LABEL: bare_stack, INSTANCE_LABEL: inst,
                        BENCH_LABEL: self.run_id})
        bare_ids: dict[str, str] = {}
        res = {"workers": n, "stub_containers": len(bare),
               "daemon_containers": len(sp), "ours": [], "bare": []}

        def ours(first: bool) -> dict:
            self.daemon, saved = daemon, self.daemon
            try:
                t0 = daemon.start()
                t_ready, st = daemon.wait_ready(timeout=900, every=0.25)
                evs = daemon.events()
                sr = next((e for e in evs if e["event"] == "stack_ready"), None)
                r = {"first": first, "seconds": rnd(t_ready - t0),
                     "stack_ready_log_seconds": sr["seconds"] if sr else None,
                     "tier_ready_seconds": {e["tier"]: e["seconds"] for e in evs
                                            if e["event"] == "tier_ready"},
                     "created": sum(1 for e in evs if e["event"] == "created"),
                     "create_span_seconds": rnd(max(created) - min(created))
                     if (created := [e["t"] for e in evs if e["event"] == "created"]) else None,
                     "ready_total": f"{st['ready']}/{st['total']}"}
                status = dict(line.split(":", 1) for line in Path(
                    f"/proc/{daemon.pid}/status").read_text().splitlines() if ":" in line)
                r["daemon_rss_mib_when_ready"] = round(int(status["VmRSS"].split()[0]) / 1024, 1)
                lat = []
                for _ in range(20):
                    ts = time.perf_counter()
                    daemon.status()
                    lat.append(time.perf_counter() - ts)
                r["api_v1_status_median_seconds"] = rnd(statistics.median(lat), 4)
                r["stop"] = self.stop_ours()
                return r
            finally:
                self.daemon = saved

        try:
            plan = [("ours", True), ("bare", True)]
            for r in range(self.args.scale_rounds):
                plan += [("bare", False), ("ours", False)] if r % 2 == 0 else \
                    [("ours", False), ("bare", False)]
            for method, first in plan:
                log(f"scale {n}: {method} ({'creates containers' if first else 'existing'})")
                if method == "ours":
                    res["ours"].append(ours(first))
                else:
                    b = self.bare_start(bare, bare_ids, create=first)
                    b["first"] = first
                    res["bare"].append(b)
                log(f"  {res[method][-1]['seconds']} s")
        finally:
            if daemon.proc is not None:
                daemon.kill()
            bl.cleanup(self.client, name)
            try:
                self.client.api.remove_network(net["Id"])
            except docker.errors.APIError:
                pass
        again_o = [r["seconds"] for r in res["ours"] if not r["first"]]
        again_b = [r["seconds"] for r in res["bare"] if not r["first"]]
        first_o = [r["seconds"] for r in res["ours"] if r["first"]]
        first_b = [r["seconds"] for r in res["bare"] if r["first"]]
        res["summary"] = {
            "ours_first": first_o[0], "bare_first": first_b[0],
            "ratio_first": rnd(first_o[0] / first_b[0]),
            "ours_first_create_span": res["ours"][0].get("create_span_seconds"),
            "ours_first_infrastructure_tier": res["ours"][0]["tier_ready_seconds"]
            .get("infrastructure"),
            "daemon_rss_mib_when_ready_max": max(r["daemon_rss_mib_when_ready"]
                                                 for r in res["ours"]),
            "api_v1_status_median_seconds": rnd(statistics.median(
                [r["api_v1_status_median_seconds"] for r in res["ours"]]), 4),
            "ours_existing_workers_tier_median": rnd(statistics.median(
                [r["tier_ready_seconds"].get("workers") for r in res["ours"] if not r["first"]])),
            "ours_existing_median": rnd(statistics.median(again_o)),
            "bare_existing_median": rnd(statistics.median(again_b)),
            "ratio_existing_median": rnd(statistics.median(
                [o / b for o, b in zip(again_o, again_b)]))}
        return res

    def section_scale(self) -> None:
        out = self.results.setdefault("scale", {
            "label": "ORCHESTRATION ONLY: synapse-supervisor/stub:1 stands in for Synapse "
                     "(READY=1 after 1 s, /health, replication metric); proves nothing about "
                     "Synapse itself", "runs": []})
        for n in self.args.scale:
            self.assert_stopped()
            out["runs"].append(self.scale_one(n))
            self.save_partial()

    # --- results -----------------------------------------------------------------------------

    def save_partial(self) -> None:
        (self.work / "partial.json").write_text(json.dumps(self.results, indent=1))

    def cleanup(self) -> None:
        try:
            for d in (self.daemon, self.init_daemon):
                if d is not None:
                    d.kill()
            if self.compose_file.exists():
                subprocess.run(["docker-compose", "-p", self.compose_project, "-f",
                                str(self.compose_file), "down"], capture_output=True)
        finally:
            removed = bl.cleanup(self.client, self.base)
            self.events.close()
            self.results.setdefault("cleanup", removed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short smoke variant")
    p.add_argument("--sections", default="start,cost,crash,scale",
                   help="comma list of start,cost,crash,scale (default: all)")
    p.add_argument("--rounds", type=int, help="cold-start rounds (default 5; quick 1)")
    p.add_argument("--kills", type=int, help="kills per method (default 20; quick 3)")
    p.add_argument("--idle", type=int, help="idle seconds for the daemon's cost (600; quick 60)")
    p.add_argument("--status-calls", type=int, help="status calls (default 200; quick 50)")
    p.add_argument("--scale", help="worker counts (default 50,100,200; quick 10,30)")
    p.add_argument("--scale-rounds", type=int, help="restarts per count (default 2; quick 1)")
    p.add_argument("--quiet-wait", type=int, help="max s to wait for a quiet machine "
                   "(default 2400; quick 0)")
    p.add_argument("--workdir", help="stack directories and logs (default /var/tmp/ssbench-ID)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (1 if q else 5)
    a.kills = a.kills or (3 if q else 20)
    a.crash_blocks = 1 if q else 2
    a.idle = a.idle if a.idle is not None else (60 if q else 600)
    a.status_calls = a.status_calls or (50 if q else 200)
    a.scale = [int(x) for x in (a.scale or ("10,30" if q else "50,100,200")).split(",")]
    a.scale_rounds = a.scale_rounds or (1 if q else 2)
    a.quiet_wait = a.quiet_wait if a.quiet_wait is not None else (0 if q else 2400)
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]

    bench = Bench(a)
    t_start = time.time()
    res = bench.results
    res.update({"schema": 1, "run_id": bench.run_id, "quick": q,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
                "machine": bl.machine_info(bench.client), "code": bl.CODE_INFO,
                "config": {"rounds": a.rounds, "kills_per_method": a.kills,
                           "crash_blocks": a.crash_blocks, "idle_seconds": a.idle,
                           "status_calls": a.status_calls, "scale_workers": a.scale,
                           "scale_rounds": a.scale_rounds, "sections": sections,
                           "poll_seconds": bl.POLL}, "errors": {}})
    if a.quiet_wait:
        log(f"waiting up to {a.quiet_wait} s for a quiet machine")
        res["quiet_wait"] = bl.wait_quiet(bench.client, a.quiet_wait)
        log(f"  {res['quiet_wait']}")
    res["load"] = {"before": bl.loadavg(),
                   "other_stack_containers_before": bl.other_stack_containers(bench.client)}
    sampler = bl.LoadSampler(bench.client)
    code = 0
    try:
        bench.init_main_stack()
        for name in sections:
            fn = getattr(bench, f"section_{name}")
            t_sec = time.time()
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - record, reset, go on
                code = 1
                res["errors"][name] = f"{type(err).__name__}: {err}"[:3000]
                log(f"section {name} FAILED: {err}\n{traceback.format_exc()}")
                bench.stop_all()
            res.setdefault("section_seconds", {})[name] = round(time.time() - t_sec)
            res.setdefault("section_windows", {})[name] = [round(t_sec, 1),
                                                           round(time.time(), 1)]
    finally:
        bench.cleanup()
        res["load"]["after"] = bl.loadavg()
        res["load"]["other_stack_containers_after"] = bl.other_stack_containers(bench.client)
        res["load"]["during"] = sampler.close()
        res["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        res["duration_seconds"] = round(time.time() - t_start)
        import report
        paths = report.write(res, RESULTS, quick=q)
        log("wrote " + ", ".join(str(p.relative_to(bl.REPO)) for p in paths))
        for lock in Path("/run/synapse-stack").glob(f"{bench.base}*.lock"):
            lock.unlink(missing_ok=True)  # the daemon's per-stack lock files
        if not a.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
            if bl.CODE_INFO.get("snapshot"):
                shutil.rmtree(bl.CODE_INFO["snapshot"], ignore_errors=True)
        else:
            log(f"kept {bench.work}")
    return code


if __name__ == "__main__":
    sys.exit(main())
