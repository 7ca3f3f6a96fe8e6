"""Helpers for bench/sidebyside.py: machine facts, Docker's event stream, the daemon as a
subprocess, readiness probes, container creation from the daemon's own specs, statistics.

Times are wall-clock seconds (time.time()): Docker's events (timeNano) and the daemon's JSON
log timestamps are wall-clock too, so all three can be put on one axis.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import docker
import docker.errors
import yaml
from docker.types import Mount as DockerMount

REPO = Path(__file__).resolve().parents[1]


def _code_snapshot() -> tuple[Path, dict]:
    """The product code under test. Default: a snapshot of the committed HEAD (`git archive`),
    so that files other engineers are editing right now are not measured half-done.
    SSBENCH_CODE=worktree measures the working tree instead."""
    git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True,  # noqa
                                    text=True).stdout.strip()
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--", "supervisor"))
    if os.environ.get("SSBENCH_CODE", "head") == "worktree":
        return REPO, {"mode": "worktree", "commit": commit, "supervisor_dirty": dirty}
    dest = Path(f"/var/tmp/ssbench-code-{commit[:12]}")
    if not (dest / "supervisor" / "__init__.py").exists():
        tmp = Path(f"{dest}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "supervisor"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        try:
            tmp.rename(dest)
        except OSError:  # another run made it meanwhile
            subprocess.run(["rm", "-rf", str(tmp)])
    return dest, {"mode": "head", "commit": commit, "supervisor_dirty_in_worktree": dirty,
                  "snapshot": str(dest)}


CODE, CODE_INFO = _code_snapshot()
sys.path.insert(0, str(CODE))

from supervisor import control_client  # noqa: E402
from supervisor.containers import ContainerSpec, specs  # noqa: E402
from supervisor.errors import SupervisorError  # noqa: E402
from supervisor.prepare import prepare  # noqa: E402

VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python")
ENV = dict(os.environ, PYTHONPATH=str(CODE))
SYNAPSECTL = [PYTHON, "-P", "-m", "supervisor.cli"]  # synapsectl, from the code under test
DAEMON = [PYTHON, "-P", "-m", "supervisor.daemon"]  # synapse-supervisor, likewise
STACK_LABEL = "synapse-supervisor.stack"
INSTANCE_LABEL = "synapse-supervisor.instance"
BENCH_LABEL = "synapse-supervisor.bench"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
REPLICATION_METRIC = "synapse_replication_tcp_resource_total_connections"
POLL = 0.1  # every readiness poll in this bench: 0.1 s, as the brief and the daemon use


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


# --- statistics ---------------------------------------------------------------------------

def pctl(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); with fewer than 100 values p99 is the maximum."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    rank = max(1, int(-(-q * len(vals) // 100)))
    return vals[min(rank, len(vals)) - 1]


def summary(values: list[float], digits: int = 3) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0}
    r = lambda v: round(v, digits)  # noqa: E731
    return {"n": len(vals), "median": r(statistics.median(vals)), "min": r(min(vals)),
            "max": r(max(vals)), "mean": r(statistics.fmean(vals)), "p99": r(pctl(vals, 99)),
            "values": [r(v) for v in vals]}


# --- the machine ----------------------------------------------------------------------------

def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def other_stack_containers(client: docker.DockerClient, prefix: str = "ssbench") -> list[str]:
    """Running containers of synapse-supervisor stacks that are not this bench's."""
    out = []
    for c in client.api.containers(filters={"label": STACK_LABEL}):
        stack = (c.get("Labels") or {}).get(STACK_LABEL, "")
        if not stack.startswith(prefix):
            out.append((c.get("Names") or ["?"])[0].lstrip("/"))
    return sorted(out)


def machine_info(client: docker.DockerClient) -> dict:
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    ver = client.version()
    compose = subprocess.run(["docker-compose", "version", "--short"], capture_output=True,
                             text=True).stdout.strip()
    try:
        os_name = next(line.split("=", 1)[1].strip('"') for line in
                       Path("/etc/os-release").read_text().splitlines()
                       if line.startswith("PRETTY_NAME="))
    except (OSError, StopIteration):
        os_name = platform.platform()
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "memory_gib": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "os": os_name,
            "docker_server": ver.get("Version"), "docker_api": ver.get("ApiVersion"),
            "docker_compose": compose, "python": platform.python_version(),
            "hostname_hash": f"{abs(hash(socket.gethostname())) % 10**6:06d}"}


class LoadSampler:
    """Every `every` s: load average and how many other stacks' containers run (the noise)."""

    def __init__(self, client: docker.DockerClient, every: float = 10.0) -> None:
        self.client, self.every = client, every
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="load")
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                others = len(other_stack_containers(self.client))
            except Exception:  # noqa: BLE001
                others = None
            self.samples.append({"t": round(time.time(), 1), "load1": loadavg()[0],
                                 "other_stack_containers": others})
            if self._stop.wait(self.every):
                return

    def close(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=5)
        loads = [s["load1"] for s in self.samples]
        others = [s["other_stack_containers"] for s in self.samples
                  if s["other_stack_containers"] is not None]
        return {"every_seconds": self.every, "load1": summary(loads, 2),
                "other_stack_containers_max": max(others) if others else None,
                "share_of_samples_with_other_stacks": round(
                    sum(1 for o in others if o) / len(others), 2) if others else None,
                "samples": self.samples}


def wait_quiet(client: docker.DockerClient, max_wait: float, every: float = 30.0,
               load_limit: float = 1.5) -> dict:
    """Wait until no other stack's containers run and the 1-minute load is below the limit."""
    t0 = time.time()
    checks = 0
    while True:
        others = other_stack_containers(client)
        load = loadavg()[0]
        checks += 1
        if not others and load < load_limit:
            return {"quiet": True, "waited_seconds": round(time.time() - t0), "checks": checks,
                    "load1": load, "other_stack_containers": []}
        if time.time() - t0 >= max_wait:
            return {"quiet": False, "waited_seconds": round(time.time() - t0), "checks": checks,
                    "load1": load, "other_stack_containers": others}
        log(f"waiting for a quiet machine: load {load:.2f}, {len(others)} other stack "
            f"containers ({', '.join(others[:4])}{'...' if len(others) > 4 else ''})")
        time.sleep(every)


# --- Docker's event stream ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Event:
    t: float
    action: str
    container_id: str
    stack: str
    instance: str
    name: str
    exit_code: int | None


class Events:
    """Every container event of stacks whose name starts with `prefix`, as `Event`s.

    docker-py's event stream over the unix socket inherits the client's read timeout and
    simply ends after that long without an event; the reader then reconnects with `since=`
    the last event it saw and drops the duplicates."""

    def __init__(self, client: docker.DockerClient, prefix: str, timeout: int = 3600) -> None:
        self.prefix = prefix
        self.events: list[Event] = []
        self.reconnects = 0
        self._api = docker.from_env(timeout=timeout).api
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self._stream = None
        self._seen: set[tuple] = set()
        self._thread = threading.Thread(target=self._run, daemon=True, name="events")
        self._started = threading.Event()
        self._thread.start()
        self._started.wait(10)

    def _run(self) -> None:
        since = time.time()
        while not self._closed.is_set():
            try:
                self._stream = self._api.events(
                    since=since, decode=True,
                    filters={"type": "container", "label": [STACK_LABEL]})
                self._started.set()
                for ev in self._stream:
                    nano = int(ev.get("timeNano", 0))
                    since = max(since, nano / 1e9)
                    key = (nano, ev.get("id"), ev.get("Action") or ev.get("status"))
                    if key in self._seen:
                        continue
                    self._seen.add(key)
                    attrs = (ev.get("Actor") or {}).get("Attributes") or {}
                    stack = attrs.get(STACK_LABEL, "")
                    if not stack.startswith(self.prefix):
                        continue
                    code = attrs.get("exitCode")
                    e = Event(t=nano / 1e9, action=ev.get("Action") or ev.get("status", ""),
                              container_id=ev.get("id") or (ev.get("Actor") or {}).get("ID", ""),
                              stack=stack, instance=attrs.get(INSTANCE_LABEL, ""),
                              name=attrs.get("name", ""),
                              exit_code=int(code) if code is not None else None)
                    with self._cond:
                        self.events.append(e)
                        self._cond.notify_all()
            except Exception:  # noqa: BLE001 - dropped or closed: reconnect unless closing
                pass
            if not self._closed.is_set():
                self.reconnects += 1
                time.sleep(0.2)

    def find(self, pred) -> list[Event]:
        with self._cond:
            return [e for e in self.events if pred(e)]

    def wait(self, pred, timeout: float) -> Event:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError("timed out waiting for a Docker event")
                self._cond.wait(left)

    def close(self) -> None:
        self._closed.set()
        try:
            if self._stream is not None:
                self._stream.close()
        except Exception:  # noqa: BLE001
            pass


# --- probes (no proxy; the same signals the daemon uses) --------------------------------------

def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with OPENER.open(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def replication_up(ip: str, timeout: float = 1.0) -> bool:
    try:
        with OPENER.open(f"http://{ip}:9000/_synapse/metrics", timeout=timeout) as resp:
            text = resp.read().decode(errors="replace")
    except (urllib.error.URLError, OSError, ValueError):
        return False
    total = 0.0
    for line in text.splitlines():
        if line.startswith(REPLICATION_METRIC) and line[len(REPLICATION_METRIC):][:1] in " {":
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return total >= 1


def postgres_accepts(ip: str, user: str = "synapse", database: str = "synapse") -> bool:
    params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
    body = struct.pack("!I", 196608) + params
    try:
        with socket.create_connection((ip, 5432), timeout=1.0) as sock:
            sock.sendall(struct.pack("!I", len(body) + 4) + body)
            return sock.recv(1) == b"R"
    except OSError:
        return False


def redis_answers(ip: str) -> bool:
    try:
        with socket.create_connection((ip, 6379), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def health(ip: str) -> bool:
    return http_ok(f"http://{ip}:8008/health")


def synapse_ready(ip: str) -> bool:
    """The daemon's definition: /health 200 and Redis replication connected."""
    return health(ip) and replication_up(ip)


def poll(check, timeout: float, what: str, alive=None) -> float:
    """Call check() every POLL s until true; return the wall time it first held."""
    deadline = time.monotonic() + timeout
    n = 0
    while True:
        if check():
            return time.time()
        n += 1
        if alive is not None and n % 10 == 0 and not alive():
            raise BenchError(f"{what}: the container exited while waiting")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready within {timeout:.0f} s")
        time.sleep(POLL)


# --- a stack directory, and the daemon ------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_stack(directory: Path, name: str, edit=None) -> Path:
    """`synapsectl init ... --isolated` (what an operator runs), then bench-only edits."""
    subprocess.run(
        [*SYNAPSECTL, "init", str(directory), "--server-name", f"{name}.test",
         "--name", name, "--isolated", "--client-port", str(free_port()), "--federation-port",
         str(free_port()), "--metrics-port", str(free_port())], check=True,
        capture_output=True, env=ENV)
    stack_file = directory / "stack.yaml"
    data = yaml.safe_load(stack_file.read_text())
    data["daemon"]["control_socket"] = str(directory / "control.sock")
    if edit:
        edit(data)
    stack_file.write_text(yaml.safe_dump(data, sort_keys=False))
    return stack_file


def parse_ts(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Daemon:
    """`synapse-supervisor --stack FILE --log-format json` as a subprocess, one log per run."""

    def __init__(self, stack_file: Path, log_dir: Path) -> None:
        self.stack_file = stack_file
        self.log_dir = log_dir
        self.socket = str(yaml.safe_load(stack_file.read_text())["daemon"]["control_socket"])
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self.runs = 0
        self.t_popen = 0.0

    def start(self) -> float:
        self.runs += 1
        self.log_path = self.log_dir / f"{self.stack_file.parent.name}-daemon-{self.runs}.log"
        out = open(self.log_path, "w")
        self.t_popen = time.time()
        self.proc = subprocess.Popen(
            [*DAEMON, "--stack", str(self.stack_file), "--log-format", "json"], stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True, env=ENV)
        out.close()
        return self.t_popen

    def status(self) -> dict | None:
        try:
            return control_client.request(self.socket, "GET", "/v1/status")
        except (SupervisorError, OSError, ValueError):
            return None

    def wait_ready(self, timeout: float = 600, every: float = POLL) -> tuple[float, dict]:
        """Poll the control API's /v1/status (what `synapsectl status --json` prints) until
        the stack's state is ready; return the wall time and the status."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"daemon exited {self.proc.returncode}:\n{self.tail()}")
            st = self.status()
            if st is not None:
                last = st
                if st.get("state") == "ready":
                    return time.time(), st
                if st.get("state") == "degraded":
                    raise BenchError(f"stack degraded: {json.dumps(st)[:2000]}\n{self.tail()}")
            time.sleep(every)
        raise BenchError(f"stack not ready in {timeout} s: {last}\n{self.tail()}")

    def stop(self, timeout: float = 300) -> tuple[float, float, int]:
        """SIGTERM; return (signal time, exit time, exit code)."""
        assert self.proc is not None
        t_sig = time.time()
        os.kill(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        t_exit = time.time()
        self.proc = None
        return t_sig, t_exit, code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=120)
            except Exception:  # noqa: BLE001
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def events(self) -> list[dict]:
        out = []
        if self.log_path is None:
            return out
        for line in self.log_path.read_text().splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and "timestamp" in ev:
                ev["t"] = parse_ts(ev["timestamp"])
                out.append(ev)
        return out

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except (OSError, AttributeError):
            return ""


# --- containers from the daemon's own specs ---------------------------------------------------

def stack_specs(stack_file: Path, client: docker.DockerClient) -> dict[str, ContainerSpec]:
    prepared = prepare(stack_file)
    st = prepared.stack
    ids = {}
    for img in (st.images.synapse, st.images.postgres, st.images.redis):
        try:
            ids[img] = client.api.inspect_image(img)["Id"]
        except docker.errors.ImageNotFound:
            ids[img] = ""
    return specs(prepared, ids)


def create_from_spec(client: docker.DockerClient, spec: ContainerSpec,
                     restart_policy: str = "no") -> str:
    """What DockerEngine.create does, with a choice of Docker restart policy."""
    api = client.api
    mounts = [DockerMount(target=m.target, source=m.source, type=m.kind, read_only=m.read_only)
              for m in spec.mounts]
    res = spec.resources
    host_config = api.create_host_config(
        mounts=mounts, port_bindings=dict(spec.ports), mem_limit=res.memory,
        nano_cpus=int(res.cpus * 1e9) if res.cpus else None, pids_limit=res.pids,
        read_only=spec.read_only or None, tmpfs=spec.tmpfs or None,
        cap_drop=list(spec.cap_drop) or None, cap_add=list(spec.cap_add) or None,
        security_opt=list(spec.security_opt) or None, network_mode=spec.network,
        restart_policy={"Name": restart_policy}, init=False)
    networking = api.create_networking_config({
        spec.network: api.create_endpoint_config(aliases=[spec.instance])})
    created = api.create_container(
        spec.image, command=list(spec.command) if spec.command else None, name=spec.name,
        environment=spec.env, labels=spec.labels, user=spec.user,
        ports=[int(p.split("/")[0]) for p in spec.ports], host_config=host_config,
        networking_config=networking, stop_signal=spec.stop_signal,
        stop_timeout=int(spec.stop_timeout), detach=True)
    return created["Id"]


def container_ip(client: docker.DockerClient, cid: str) -> str | None:
    nets = client.api.inspect_container(cid)["NetworkSettings"]["Networks"] or {}
    return next((n.get("IPAddress") for n in nets.values() if n.get("IPAddress")), None)


def is_running(client: docker.DockerClient, cid: str) -> bool:
    try:
        return bool(client.api.inspect_container(cid)["State"]["Running"])
    except docker.errors.NotFound:
        return False


def stack_containers(client: docker.DockerClient, stack: str) -> dict[str, str]:
    """instance -> container id, for one stack label value."""
    found = client.api.containers(all=True, filters={"label": f"{STACK_LABEL}={stack}"})
    return {(c.get("Labels") or {}).get(INSTANCE_LABEL, c["Id"]): c["Id"] for c in found}


def running_of(client: docker.DockerClient, prefix: str) -> list[str]:
    out = []
    for c in client.api.containers(filters={"label": STACK_LABEL}):
        if (c.get("Labels") or {}).get(STACK_LABEL, "").startswith(prefix):
            out.append((c.get("Names") or ["?"])[0].lstrip("/"))
    return out


def cleanup(client: docker.DockerClient, prefix: str) -> dict:
    """Remove every container, network and volume whose stack label starts with `prefix`."""
    removed = {"containers": 0, "networks": 0, "volumes": 0}
    for c in client.api.containers(all=True, filters={"label": STACK_LABEL}):
        if (c.get("Labels") or {}).get(STACK_LABEL, "").startswith(prefix):
            try:
                client.api.remove_container(c["Id"], force=True, v=False)
                removed["containers"] += 1
            except docker.errors.NotFound:
                pass
    left = []
    for n in client.api.networks(filters={"label": STACK_LABEL}):
        if (n.get("Labels") or {}).get(STACK_LABEL, "").startswith(prefix):
            for attempt in range(4):  # endpoints of just-removed containers go away lazily
                try:
                    client.api.remove_network(n["Id"])
                    removed["networks"] += 1
                    break
                except docker.errors.NotFound:
                    break
                except docker.errors.APIError:
                    if attempt == 3:
                        # dockerd 20.10 sometimes keeps stale endpoints after removing many
                        # containers ("has active endpoints"); a dockerd restart clears them.
                        left.append(n["Name"])
                    else:
                        time.sleep(2)
    if left:
        removed["networks_left"] = left
        log(f"could not remove networks {left} (stale endpoints in dockerd)")
    for v in client.api.volumes(filters={"label": STACK_LABEL}).get("Volumes") or []:
        if (v.get("Labels") or {}).get(STACK_LABEL, "").startswith(prefix):
            try:
                client.api.remove_volume(v["Name"], force=True)
                removed["volumes"] += 1
            except docker.errors.APIError:
                pass
    return removed
