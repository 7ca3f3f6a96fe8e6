"""Faults survived on the real stack, and nothing lost.

A stack of managed PostgreSQL and Redis, main, and sync, event_persister, federation_sender and
client_reader workers runs under the real daemon with a restart policy tuned small for test
speed. Before every fault the test writes messages to a room; after recovery it reads the whole
room back via /messages and counts what is missing (must be 0). Checked per fault:

* SIGKILL (`docker kill`) of each worker role: back to ready, only that container restarted
  (every other container's StartedAt unchanged, Docker's own event stream shows one start),
  counted in `synapsectl status --json` and in `synapse_supervisor_container_restarts_total`;
* SIGKILL of main: the workers are not crash-looped while main is down;
* SIGKILL of PostgreSQL and of Redis: restored first, anything else restarted after it, in
  order; the stack ready again; messages still readable (retrying through the 500s Synapse
  answers from stale pool connections);
* the daemon SIGKILLed in the middle of a start, then started again: converges, exactly one
  container per instance;
* dockerd restarted under the daemon, with start calls racing its shutdown (marker
  `dockerd_restart`; only when no other test stack runs): the event stream reconnects, a
  container whose containerd task outlived dockerd is replaced, the stack is brought back in
  order;
* on a second stack: a worker that exits at once on every start (backoff grows, `failed` after
  max_attempts, reason "exit code 2"), a worker OOM-killed by its memory limit, and an
  unreadable config mount (backoff, then `failed`, not a tight loop), while the rest stays
  ready.

Timings are never asserted. With SS_RELIABILITY_LOG=<file> every fault appends one JSON line
(fault, seconds to ready, messages lost) for bench/reliability.py and docs/reliability.md.
The long variant (`-m slow`) kills every role five times.
"""

from __future__ import annotations

import collections
import datetime
import fcntl
import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.stackrun import (REPO, STACK_LABEL, Chat, StackRun, daemon_metrics,
                                        http_json, metric_sum, metric_value, metrics_text,
                                        processes)

WORKERS = {"sync": 1, "event_persister": 1, "federation_sender": 1, "client_reader": 1}
RESTART = {"initial_delay": 0.5, "max_delay": 4, "max_attempts": 3, "stable_after": 10}
INFRA = ("postgres", "redis")
WORKER_OF = {"sync": "sync-1", "event_persister": "event-persister-1",
             "federation_sender": "federation-sender-1", "client_reader": "client-reader-1"}
WORKER_NAMES = tuple(WORKER_OF.values())
ALL = INFRA + ("main",) + WORKER_NAMES  # plus "proxy" when the stack runs the managed proxy
# What must be up before each container comes back (restart order): the proxy needs only main.
NEEDS = {"main": INFRA, **{w: INFRA + ("main",) for w in WORKER_NAMES}, "proxy": ("main",)}
RECOVER_TIMEOUT = 240.0


# ------------------------------------------------------------------------------- helpers


def record(fault: str, seconds: float | None, lost: int | None,
           outcome: str = "recovered", extra: dict | None = None) -> None:
    """One line for bench/reliability.py; tests never assert on timings. `outcome` is
    "recovered" (back to ready) or "failed as designed" (seconds until marked failed)."""
    path = os.environ.get("SS_RELIABILITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"fault": fault, "seconds": seconds, "lost": lost,
                                "outcome": outcome, "at": time.time(), **(extra or {})}) + "\n")


def started_at(run: StackRun) -> dict[str, str]:
    return {i: c.attrs["State"]["StartedAt"] for i, c in run.containers().items()}


def epoch(stamp: str) -> float:
    """Docker's RFC 3339 nanosecond time (trailing zeros trimmed) as seconds."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    base = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.timezone.utc)
    return base.timestamp() + (float("0." + frac) if frac else 0.0)


def rows(status: dict) -> dict[str, dict]:
    return {c["instance"]: c for c in status["containers"]}


def docker_kill(run: StackRun, instance: str) -> float:
    t0 = time.time()
    subprocess.run(["docker", "kill", f"{run.name}-{instance}"], check=True,
                   capture_output=True, timeout=60)
    return t0


def wait_recovered(run: StackRun, instance: str, restarts_before: int,
                   timeout: float = RECOVER_TIMEOUT) -> tuple[float, dict, list[dict]]:
    """Poll status until `instance` was restarted (its counter moved) and the whole stack is
    ready again; returns (seconds, last status, every status seen meanwhile)."""
    t0 = time.monotonic()
    seen: list[dict] = []
    while time.monotonic() - t0 < timeout:
        code, out, _ = run.ctl("status", "--json", timeout=60)
        if out:
            status = json.loads(out)
            seen.append(status)
            row = rows(status)[instance]
            if row["restarts"] > restarts_before and row["ready"] and \
                    status["state"] == "ready":
                return time.monotonic() - t0, status, seen
        time.sleep(0.2)
    raise AssertionError(f"{instance} not back to ready in {timeout}s: "
                         f"{seen[-1] if seen else None}\n{run.log_tail()}")


def first_starts(run: StackRun, since: float) -> dict[str, float]:
    first: dict[str, float] = {}
    for inst, t in run.events.of("start", since=since):
        first.setdefault(inst, t)
    return first


def assert_in_dependency_order(starts: dict[str, float | str]) -> None:
    """Whatever (re)started did so dependencies first: infrastructure, main, workers (and the
    proxy after main)."""
    for b, tb in starts.items():
        for a in NEEDS.get(b, ()):
            if a in starts:
                assert starts[a] <= tb, f"{b} started before its dependency {a}: {starts}"


def sync_sees(run: StackRun, chat: Chat, body: str, timeout: float = 90) -> str | None:
    """The sync worker (on its own address) delivers `body`, i.e. replication works again:
    None, or what it answered last. Each poll asks with a different `timeout` parameter:
    Synapse caches a completed /sync answer per request key for 2 minutes
    (caches.sync_response_cache_duration), and an identical poll would only see that."""
    deadline = time.monotonic() + timeout
    last: object = None
    n = int(time.monotonic() * 1000) % 100000
    while time.monotonic() < deadline:
        n += 1
        url = f"http://{run.ip('sync-1')}:8008/_matrix/client/v3/sync?timeout={n}"
        try:
            code, data = http_json("GET", url, token=chat.token, timeout=30)
        except OSError as err:
            code, data = 0, {"error": str(err)}
        if code == 200:
            timeline = data["rooms"]["join"].get(chat.room, {}).get("timeline", {})
            bodies = [e["content"].get("body") for e in timeline.get("events", [])]
            if body in bodies:
                return None
            last = f"200 without it; timeline ends {bodies[-3:]}"
        else:
            last = f"{code} {str(data)[:200]}"
        time.sleep(0.5)
    return f"the sync worker did not deliver {body!r} in {timeout}s; last answer: {last}"


def replicating(run: StackRun, timeout: float = 90) -> list[str]:
    """Synapse processes whose Redis replication is not (yet again) connected."""
    deadline = time.monotonic() + timeout
    while True:
        down = []
        for inst in ("main",) + WORKER_NAMES:
            try:
                value = metric_sum(metrics_text(run.ip(inst)),
                                   "synapse_replication_tcp_resource_total_connections")
            except OSError:
                value = 0
            if value < 1:
                down.append(inst)
        if not down or time.monotonic() > deadline:
            return down
        time.sleep(0.5)


def kill_and_recover(run: StackRun, chat: Chat, instance: str, label: str) -> float:
    """Write messages, SIGKILL `instance`, wait until the stack is ready again, check that only
    `instance` was restarted (workers and main) or that restarts followed dependency order
    (infrastructure), and that nothing was lost. Returns seconds to ready."""
    chat.send(5, f"before {label}")
    before = started_at(run)
    status = run.status()
    restarts = {i: r["restarts"] for i, r in rows(status).items()}
    t0 = docker_kill(run, instance)
    seconds, status, seen = wait_recovered(run, instance, restarts[instance])
    row = rows(status)[instance]
    assert row["restarts"] == restarts[instance] + 1, row
    assert row["last_exit_code"] == 137 and row["last_exit_reason"] == "signal 9 (SIGKILL)", row
    after = started_at(run)
    assert after[instance] != before[instance]
    starts = first_starts(run, t0)
    assert next(iter(sorted(starts, key=starts.get))) == instance, starts
    if instance not in INFRA:
        # nobody else was restarted: neither by the daemon nor by Docker
        for inst in run.instances:
            if inst != instance:
                assert after[inst] == before[inst], f"{inst} was restarted too"
                assert rows(status)[inst]["restarts"] == restarts[inst], inst
        assert list(starts) == [instance], starts
    else:
        assert_in_dependency_order(starts)
    # the daemon's own metrics count it
    text = daemon_metrics(run)
    assert metric_value(text, "synapse_supervisor_container_restarts_total",
                        instance=instance, stack=run.name) == restarts[instance] + 1
    assert metric_value(text, "synapse_supervisor_stack_ready", stack=run.name) == 1.0
    lost = chat.missing()
    record(label, seconds, len(lost))
    assert lost == [], f"{len(lost)} messages lost after {label}: {lost[:5]}"
    return seconds


# ------------------------------------------------------------------------------ the stack


def shims_of(container_ids: set[str]) -> dict[int, list[bytes]]:
    """containerd shims of these containers: pid -> command lines of the shim's children."""
    procs = dict(processes())
    parent = {}
    for pid in procs:
        try:
            parent[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    found = {}
    for pid, args in procs.items():
        if args and args[0].endswith(b"containerd-shim-runc-v2") and b"-id" in args:
            if args[args.index(b"-id") + 1].decode() in container_ids:
                found[pid] = [b" ".join(procs[c]) for c, p in parent.items() if p == pid]
    return found


def kill_leaked_shims(container_ids: set[str]) -> list[int]:
    """containerd shims left behind for containers that are gone (a start that raced dockerd's
    shutdown leaves one): ours only, by the container id on their command line."""
    killed = []
    for pid in shims_of(container_ids):
        try:
            os.kill(pid, signal.SIGTERM)
            killed.append(pid)
        except OSError:
            pass
    return killed


@pytest.fixture(scope="module")
def stack(docker_client, images, tmp_path_factory):
    name = f"sstf{uuid.uuid4().hex[:6]}"
    run = StackRun(tmp_path_factory.mktemp("faults") / "stack", name, dict(WORKERS),
                   docker_client, restart=dict(RESTART))
    ids: set[str] = set()
    try:
        run.start_daemon()
        status = run.wait_ready()
        run.instances = tuple(c["instance"] for c in status["containers"])
        assert set(ALL) <= set(run.instances), run.instances
        ids |= {c.id for c in run.containers().values()}
        run.chat = Chat(run)
        yield run
    finally:
        ids |= {c.id for c in run.containers().values()}
        run.cleanup()
        kill_leaked_shims(ids)


@pytest.mark.parametrize("role", list(WORKER_OF) + ["proxy"])
def test_sigkill_of_a_worker_restarts_only_that_worker(stack, role):
    instance = WORKER_OF.get(role, role)
    if instance not in stack.instances:
        pytest.skip(f"this stack runs no {role}")
    for n in range(2):
        kill_and_recover(stack, stack.chat, instance, f"SIGKILL {role}")


def test_sigkill_of_main_does_not_crash_loop_the_workers(stack):
    chat = stack.chat
    before = started_at(stack)
    restarts = {i: r["restarts"] for i, r in rows(stack.status()).items()}
    chat.send(5, "before SIGKILL main")
    docker_kill(stack, "main")
    seconds, status, seen = wait_recovered(stack, "main", restarts["main"])
    after = started_at(stack)
    for w in [i for i in stack.instances if i not in INFRA + ("main",)]:  # workers, proxy
        assert rows(status)[w]["restarts"] == restarts[w], f"{w} was restarted"
        assert after[w] == before[w], f"{w} was restarted"
        states = {rows(s)[w]["state"] for s in seen}
        assert states <= {"ready", "waiting"}, (w, states)
    for i in INFRA:
        assert after[i] == before[i]
    lost = chat.missing()
    record("SIGKILL main", seconds, len(lost))
    assert lost == []
    # the workers still work with the new main: a new message reaches the sync worker
    body = chat.send(1, "after main came back")[0]
    assert sync_sees(stack, chat, body) is None


@pytest.mark.parametrize("service", INFRA)
def test_sigkill_of_postgres_or_redis_is_restored_first(stack, service):
    kill_and_recover(stack, stack.chat, service, f"SIGKILL {service}")
    # Synapse reconnects by itself (the daemon does not restart main or the workers)...
    assert replicating(stack) == []
    # ...and the stack works again end to end: write, persist, replicate to the sync worker
    body = stack.chat.send(1, f"after {service} came back")[0]
    assert sync_sees(stack, stack.chat, body) is None
    assert stack.chat.missing() == []


@pytest.mark.slow
@pytest.mark.parametrize("instance", ALL + ("proxy",))
def test_repeated_sigkill(stack, instance, request):
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long variant: run with -m slow")
    if instance not in stack.instances:
        pytest.skip(f"this stack runs no {instance}")
    for n in range(5):
        kill_and_recover(stack, stack.chat, instance,
                         f"SIGKILL {stack.row(instance)['role']}")


@pytest.mark.parametrize("point", ["infrastructure starting", "main ready, workers starting"])
def test_daemon_sigkilled_mid_start_converges_without_duplicates(stack, point):
    chat = stack.chat
    chat.send(5, f"before daemon SIGKILL ({point})")
    assert stack.stop_daemon(signal.SIGTERM, timeout=300) == 0
    for inst, c in stack.containers().items():
        assert c.status == "exited", inst
    stack.start_daemon()
    deadline = time.monotonic() + RECOVER_TIMEOUT
    hit = None
    while time.monotonic() < deadline and hit is None:
        code, out, _ = stack.ctl("status", "--json", timeout=60)
        if out:
            r = rows(json.loads(out))
            if point.startswith("infra") and r["postgres"]["state"] == "starting":
                hit = r
            elif point.startswith("main") and r["main"]["ready"] and \
                    not all(r[w]["ready"] for w in WORKER_NAMES):
                hit = r
        time.sleep(0.05)
    assert hit is not None, f"never saw '{point}'"
    t0 = time.monotonic()
    assert stack.stop_daemon(signal.SIGKILL) == -signal.SIGKILL
    stack.start_daemon()
    status = stack.wait_ready(timeout=RECOVER_TIMEOUT)
    seconds = time.monotonic() - t0
    assert status["ready"] == status["total"] == len(stack.instances)
    found = stack.client.containers.list(all=True,
                                         filters={"label": f"{STACK_LABEL}={stack.name}"})
    per_instance = collections.Counter(c.labels["synapse-supervisor.instance"] for c in found)
    assert per_instance == {i: 1 for i in stack.instances}, per_instance
    assert sorted(c.name for c in found) == sorted(f"{stack.name}-{i}" for i in stack.instances)
    assert all(c.status == "running" for c in found)
    lost = chat.missing()
    record(f"daemon SIGKILL mid-start ({point})", seconds, len(lost))
    assert lost == []


# ------------------------------------------------------------------ dockerd restarted


def dockerd_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "dockerd":
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def ancestors() -> set[int]:
    """This process and its parents (a bench script running pytest is not 'someone else')."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def other_activity(run: StackRun) -> str | None:
    """Why restarting dockerd now would hurt someone else, or None."""
    for c in run.client.containers.list():
        stack = c.labels.get(STACK_LABEL)
        if (stack and stack != run.name) or c.name.startswith("sstest-") or \
                "synapse-supervisor.test" in c.labels:
            return f"container {c.name} of another test is running"
    mine = ancestors() | ({run.proc.pid} if run.proc else set())
    for pid, args in processes():
        if pid in mine:
            continue
        cmd = b" ".join(args).decode(errors="replace")
        if ("synapse-supervisor --stack" in cmd or "supervisor.daemon" in cmd) and \
                str(run.stack_file) not in cmd:
            return f"another synapse-supervisor runs (pid {pid})"
        if "docker build" in cmd or "debootstrap" in cmd or "image/build" in cmd:
            return f"an image build runs (pid {pid})"
        if "pytest" in cmd or "/bench/" in cmd or "bench/run" in cmd or "compose" in cmd:
            return f"another test or benchmark runs (pid {pid}: {cmd[:80]})"
    return None


def wait_ready_or_stuck(run: StackRun, timeout: float = RECOVER_TIMEOUT) -> tuple[dict, bool]:
    """(last status, ready?): gives up early once a container is `failed`, which needs an
    operator."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        assert run.proc.poll() is None, "the daemon exited:\n" + run.log_tail()
        code, out, _ = run.ctl("status", "--json", timeout=60)
        if out:
            status = json.loads(out)
            if status["state"] == "ready":
                return status, True
            if any(r["state"] == "failed" for r in status["containers"]):
                time.sleep(5)  # is it really stuck? failed needs an operator
                status = run.status()
                if status["state"] != "ready" and \
                        any(r["state"] == "failed" for r in status["containers"]):
                    return status, False
        time.sleep(0.3)
    return status, False


class ShutdownRacer:
    """Crash-and-restart cycles (kill, start) of Synapse containers, over connections opened
    before dockerd's SIGTERM, for as long as dockerd answers. dockerd closes its listener
    first and then stops the containers, still answering on open connections: a start that
    lands late in its shutdown leaves a containerd task behind, and after the restart every
    start of that container is refused with "task <id>: already exists". The daemon's own
    restarts can land there (1 run in 5 before the fix); cycling makes it likely."""

    def __init__(self, container_ids: list[str]) -> None:
        import docker
        import threading
        self.ids = container_ids
        self.stop = threading.Event()
        self.answers: collections.Counter = collections.Counter()
        self.clients = [docker.from_env(timeout=30) for _ in container_ids]
        for c in self.clients:
            c.ping()  # open the connection now: new ones are refused during the shutdown
        self.threads = [threading.Thread(target=self._hammer, args=(c, cid), daemon=True)
                        for c, cid in zip(self.clients, container_ids)]

    def _hammer(self, client, cid: str) -> None:
        while not self.stop.is_set():
            try:
                client.api.kill(cid)
            except Exception:  # noqa: BLE001 - not running: start it below
                pass
            try:
                client.api.start(cid)
                self.answers["started"] += 1
            except Exception as err:  # noqa: BLE001 - counting what dockerd answered
                text = str(err)
                if "Connection" in text or "No such file" in text:
                    self.answers["connection closed: " + text[-60:]] += 1
                    return
                self.answers[re.sub(r"[0-9a-f]{12,}", "<id>", text)[:60]] += 1
            time.sleep(0.02)

    def __enter__(self) -> "ShutdownRacer":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)
        for c in self.clients:
            c.close()


@pytest.mark.dockerd_restart
def test_dockerd_restart_under_the_daemon(stack, docker_client):
    """dockerd stopped (every container with it) and started again, with start calls racing
    its shutdown: the daemon reconnects, replaces any container whose task outlived dockerd,
    and brings the stack back in dependency order."""
    lock_path = REPO / "image" / ".cache" / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:  # hold image/build's lock: no build may start while dockerd is away
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pytest.skip("an image/build is running; not restarting dockerd under it")
        why = other_activity(stack)
        if why:
            pytest.skip(f"not restarting the host's dockerd: {why}")
        pids = dockerd_pids()
        if len(pids) != 1:
            pytest.skip(f"expected one dockerd process, found {pids}")
        chat = stack.chat
        chat.send(5, "before dockerd restart")
        reconnects = metric_value(daemon_metrics(stack),
                                  "synapse_supervisor_event_stream_reconnects_total",
                                  stack=stack.name) or 0.0
        before_ids = {i: c.id for i, c in stack.containers().items()}
        log_mark = len(stack.log_events())
        t0 = time.monotonic()
        wall0 = time.time()
        synapse = [cid for inst, cid in before_ids.items() if inst not in INFRA + ("proxy",)]
        with ShutdownRacer(synapse) as racer:
            time.sleep(1.0)  # crash-restart cycles under way (the daemon sees them too)
            os.kill(pids[0], signal.SIGTERM)
            deadline = time.monotonic() + 120
            while Path(f"/proc/{pids[0]}").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        assert not Path(f"/proc/{pids[0]}").exists(), "dockerd did not exit on SIGTERM"
        subprocess.run([str(REPO / "scripts" / "ensure-docker")], check=True, timeout=300)
        status, ready = wait_ready_or_stuck(stack)
        seconds = time.monotonic() - t0
    finally:
        os.close(lock)
    replaced = [e["instance"] for e in stack.log_events()[log_mark:]
                if e.get("event") == "container_replaced"]
    print(f"racer: {dict(racer.answers)}; replaced by the daemon: {replaced}")
    if not ready:
        record("dockerd restart", None, None, "not recovered")
        stuck = {r["instance"]: (r["state"], r["last_exit_reason"]) for r in status["containers"]
                 if not r["ready"]}
        raise AssertionError(f"the stack did not come back after dockerd restarted: {stuck}; "
                             f"replaced: {replaced}")
    assert status["ready"] == status["total"] == len(stack.instances)
    found = {c.labels["synapse-supervisor.instance"]: c for c in docker_client.containers.list(
        all=True, filters={"label": f"{STACK_LABEL}={stack.name}"})}
    assert sorted(found) == sorted(stack.instances)  # one container per instance
    for inst in replaced:
        assert found[inst].id != before_ids[inst], f"{inst} reported replaced but is not"
    starts = {}
    for inst, c in found.items():
        assert c.status == "running", inst
        starts[inst] = epoch(c.attrs["State"]["StartedAt"])
        assert starts[inst] > wall0, f"{inst} was not restarted after dockerd came back"
    assert_in_dependency_order(starts)
    assert (metric_value(daemon_metrics(stack),
                         "synapse_supervisor_event_stream_reconnects_total",
                         stack=stack.name) or 0) > reconnects
    lost = chat.missing(timeout=180)
    record("dockerd restart", seconds, len(lost),
           extra={"replaced": len(replaced)})
    assert lost == []
    # what a replaced container leaves behind is an empty shim, not a second Synapse
    gone = set(before_ids.values()) - {c.id for c in found.values()}
    assert {pid: kids for pid, kids in shims_of(gone).items() if kids} == {}
    kill_leaked_shims(gone)


# ------------------------------------------------------------------ a stack that fails

BROKEN_WORKERS = {
    # the image's entrypoint exits 2 at once: the config file does not exist
    "client_reader": {"count": 1, "env": {"SYNAPSE_CONFIG_FILES": "/conf/missing.yaml"}},
    # Synapse needs ~90 MiB: killed by the kernel on every start
    "sync": {"count": 1, "resources": {"memory": "40m"}},
    "event_persister": 1,
}
BROKEN_RESTART = {"initial_delay": 0.5, "max_delay": 4, "max_attempts": 4, "stable_after": 10}


@pytest.fixture(scope="module")
def broken(docker_client, images, tmp_path_factory):
    name = f"sstb{uuid.uuid4().hex[:6]}"
    run = StackRun(tmp_path_factory.mktemp("broken") / "stack", name, dict(BROKEN_WORKERS),
                   docker_client, restart=dict(BROKEN_RESTART))
    try:
        t0 = time.monotonic()
        run.start_daemon()
        run.failed_after = {}
        deadline = time.monotonic() + RECOVER_TIMEOUT
        while time.monotonic() < deadline:
            code, out, _ = run.ctl("status", "--json", timeout=60)
            if out:
                r = rows(json.loads(out))
                for inst in ("sync-1", "client-reader-1"):
                    if r[inst]["state"] == "failed":
                        run.failed_after.setdefault(inst, time.monotonic() - t0)
                others_ready = all(row["ready"] for inst, row in r.items()
                                   if inst not in ("sync-1", "client-reader-1"))
                if len(run.failed_after) == 2 and others_ready and \
                        json.loads(out)["state"] == "degraded":  # the first start is over
                    break
            assert run.proc.poll() is None, run.log_tail()
            time.sleep(0.3)
        yield run
    finally:
        run.cleanup()


def died_events(run: StackRun, instance: str) -> list[dict]:
    return [e for e in run.log_events() if e.get("event") == "died"
            and e.get("instance") == instance]


def assert_backoff_then_failed(run: StackRun, instance: str, since: str = "") -> list[dict]:
    """The instance is `failed` after max_attempts deaths, the retry delays grew, and it is not
    restarted any more (no tight loop)."""
    attempts = BROKEN_RESTART["max_attempts"]
    row = run.row(instance)
    assert row["state"] == "failed" and not row["ready"], row
    events = [e for e in run.log_events() if e.get("instance") == instance
              and e.get("timestamp", "") >= since]
    delays = [e["seconds"] for e in events if e.get("event") == "backoff"]
    assert len(delays) >= 2 and all(a < b for a, b in zip(delays, delays[1:])), delays
    assert delays[-1] <= BROKEN_RESTART["max_delay"] * 1.2
    assert any(e.get("event") == "failed" for e in events)
    starts = [t for inst, t in run.events.of("start") if inst == instance]
    time.sleep(6)
    assert [t for inst, t in run.events.of("start") if inst == instance] == starts, \
        "still being restarted after failed"
    assert len(delays) <= attempts
    return events


def assert_rest_ready(run: StackRun, broken_ones: set[str]) -> dict:
    status = run.status()
    for inst, row in rows(status).items():
        if inst not in broken_ones:
            assert row["ready"], row
    assert status["state"] == "degraded", status["state"]
    return status


def test_worker_exiting_at_once_backs_off_then_fails(broken):
    row = broken.row("client-reader-1")
    assert row["last_exit_code"] == 2 and row["last_exit_reason"] == "exit code 2", row
    assert row["attempts"] == BROKEN_RESTART["max_attempts"], row
    assert row["restarts"] == BROKEN_RESTART["max_attempts"] - 1, row
    events = assert_backoff_then_failed(broken, "client-reader-1")
    output = " ".join(e.get("line", "") for e in events if e.get("event") == "container_output")
    assert "/conf/missing.yaml not found" in output
    # Docker's own view: one start per attempt, and the pause between a death and the next
    # start growing (the backoff delay, plus Docker's latency)
    starts = [t for inst, t in broken.events.of("start") if inst == "client-reader-1"]
    dies = [t for inst, t in broken.events.of("die") if inst == "client-reader-1"]
    assert len(starts) == len(dies) == BROKEN_RESTART["max_attempts"], (starts, dies)
    pauses = [start - die for die, start in zip(dies, starts[1:])]
    delays = [e["seconds"] for e in events if e.get("event") == "backoff"]
    assert len(pauses) == len(delays), (pauses, delays)
    for pause, delay in zip(pauses, delays):  # Docker never saw it started before its delay
        assert pause >= delay - 0.05, (pauses, delays)
    assert_rest_ready(broken, {"client-reader-1", "sync-1"})
    text = daemon_metrics(broken)
    labels = dict(instance="client-reader-1", stack=broken.name)
    assert metric_value(text, "synapse_supervisor_container_state", state="failed",
                        **labels) == 1.0
    assert metric_value(text, "synapse_supervisor_container_last_exit", reason="exit code 2",
                        **labels) == 1.0
    assert metric_value(text, "synapse_supervisor_container_ready", **labels) == 0.0
    assert metric_value(text, "synapse_supervisor_stack_ready", stack=broken.name) == 0.0
    record("worker exits at once on every start", broken.failed_after.get("client-reader-1"),
           None, "failed as designed")


def kernel_oom_kills(container_id: str) -> int | None:
    """How many times the kernel's OOM killer hit this container (None: no kernel log)."""
    proc = subprocess.run(["dmesg"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return len(re.findall(rf"oom-kill:.*oom_memcg=[^,]*{container_id}", proc.stdout))


def test_oom_killed_worker_backs_off_then_fails(broken):
    c = broken.containers()["sync-1"]
    assert c.attrs["HostConfig"]["Memory"] == 40 * 1024 * 1024
    row = broken.row("sync-1")
    assert row["last_exit_code"] == 137, row
    assert row["attempts"] == BROKEN_RESTART["max_attempts"], row
    assert_backoff_then_failed(broken, "sync-1")
    assert [e["reason"] for e in died_events(broken, "sync-1")] and all(
        e["reason"] in ("OOM-killed", "signal 9 (SIGKILL)") for e in died_events(broken, "sync-1"))
    kills = kernel_oom_kills(c.id)
    if kills is not None:  # the kernel says it was the OOM killer (its ring buffer may have
        assert kills >= 1, "no OOM kill of this container in the kernel log"  # rotated)
    assert_rest_ready(broken, {"client-reader-1", "sync-1"})
    text = daemon_metrics(broken)
    assert metric_value(text, "synapse_supervisor_container_state", state="failed",
                        instance="sync-1", stack=broken.name) == 1.0
    record("worker OOM-killed on every start (40m limit)", broken.failed_after.get("sync-1"),
           None, "failed as designed")


def test_oom_kill_is_reported_as_oom_killed(broken):
    """Every death the kernel logged as an OOM kill of this container is reported as
    OOM-killed, whether Docker noticed or not (on cgroup v1 Docker misses most OOM kills of
    PID 1; the daemon then reads the kernel's log). The kernel rate-limits its OOM report
    (10 per 5 s), so it is the reference, not the number of deaths."""
    reasons = [e["reason"] for e in died_events(broken, "sync-1")]
    assert len(reasons) == BROKEN_RESTART["max_attempts"]
    kills = kernel_oom_kills(broken.containers()["sync-1"].id)
    if kills is None:
        pytest.skip("no kernel log to compare with (dmesg not readable)")
    assert kills >= 1
    assert reasons.count("OOM-killed") >= min(kills, len(reasons)), \
        f"daemon says {reasons}; kernel log: {kills} OOM kills of this container"
    # status and metrics say what the last death was
    assert broken.row("sync-1")["last_exit_reason"] == reasons[-1]
    assert metric_value(daemon_metrics(broken), "synapse_supervisor_container_last_exit",
                        instance="sync-1", reason=reasons[-1], stack=broken.name) == 1.0


def test_unreadable_config_mount_backs_off_then_fails_then_recovers(broken):
    """The state directory's conf/ (mounted read-only at /conf) made unreadable for uid 991:
    a crashed worker cannot come back; the daemon backs off, marks it failed with the
    reason, and an operator restart after the fix brings it back."""
    conf = broken.dir / ".state" / "conf"
    mode = conf.stat().st_mode & 0o7777
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    restarts = broken.row("event-persister-1")["restarts"]
    try:
        os.chmod(conf, 0)
        docker_kill(broken, "event-persister-1")
        t0 = time.monotonic()
        deadline = time.monotonic() + RECOVER_TIMEOUT
        while broken.row("event-persister-1")["state"] != "failed":
            assert time.monotonic() < deadline, broken.row("event-persister-1")
            time.sleep(0.3)
        record("config mount unreadable, worker SIGKILLed", time.monotonic() - t0, None,
               "failed as designed")
        row = broken.row("event-persister-1")
        assert row["last_exit_reason"] == "exit code 2", row
        assert row["restarts"] > restarts
        events = assert_backoff_then_failed(broken, "event-persister-1", since)
        output = " ".join(e.get("line", "") for e in events
                          if e.get("event") == "container_output")
        assert "/conf/shared.yaml" in output, output
        for inst in ("postgres", "redis", "main"):
            assert broken.row(inst)["ready"], inst
    finally:
        os.chmod(conf, mode)
    t0 = time.monotonic()
    code, out, err = broken.ctl("restart", "event-persister-1", "--json")
    assert code == 0, err
    assert broken.row("event-persister-1")["ready"]
    record("config mount fixed, then synapsectl restart", time.monotonic() - t0, None)
