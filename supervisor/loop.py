"""The supervisor loop: one owner of all container state, fed by one queue of typed messages.

Docker events (a thread reading the engine's event stream), Synapse's sd_notify messages (the
notify listener thread), probe results and API-call results (a small thread pool), control
requests and signals all arrive on `self.queue`; only the loop thread reads it and changes a
`Record`. The ordering comes from `lifecycle`: start tier by tier (members in parallel, each
waited for until ready), stop the same graph inverted, and after a crash restore what is down
dependency-first, with exponential backoff. Containers are reached only through an
`engine.Engine` (today `DockerEngine`).
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from . import lifecycle, probes, proxy_config
from .containers import SYNAPSE_UID, ContainerSpec, image_keys, layout_of, specs
from .engine import ContainerEvent, Engine, StaleTask
from .errors import ConfigError, StartFailed
from .lifecycle import Observed
from .notify_listener import NotifyListener
from .oom import kernel_oom_killed
from .prepare import Prepared
from .stack import CLIENT_PORT, MAIN, METRICS_PORT, POSTGRES, PROXY, REDIS, Stack
from .state import (Record, State, exit_reason, next_delay, record_death,
                    transition)
from .statedir import materialize

RELIST_EVERY = 30.0
DOCKER_RETRY = 2.0  # seconds between start attempts while the engine does not answer
PROBE_INTERVAL = 0.1


# --- messages on the queue ---------------------------------------------------------------

@dataclass(frozen=True)
class DockerMsg:
    event: ContainerEvent


@dataclass(frozen=True)
class NotifyMsg:
    instance: str
    fields: dict


@dataclass(frozen=True)
class StartedMsg:
    instance: str
    generation: int
    ip: str | None
    error: str | None
    docker_down: bool = False  # the engine did not answer: not the container's fault


@dataclass(frozen=True)
class ProbeMsg:
    instance: str
    generation: int
    ok: bool
    problem: tuple[str, str] | None = None  # (short reason, the whole story): it answers, but
    # cannot work as configured, and no retry helps


@dataclass(frozen=True)
class ProxyMsg:
    key: tuple
    error: str | None


@dataclass(frozen=True)
class RelistMsg:
    reason: str


@dataclass(frozen=True)
class WakeMsg:
    pass


@dataclass
class CallMsg:
    """Run `func(supervisor)` in the loop thread (control requests); the result goes to
    `reply`."""

    func: Callable[["Supervisor"], Any]
    reply: "queue.Queue[tuple[bool, Any]]" = field(default_factory=lambda: queue.Queue(1))


def local_images(engine: Engine, stack: Stack) -> dict[str, str]:
    """The local ID of every image the stack runs; a missing one is bad input naming its key
    (the daemon never pulls)."""
    ids = {}
    for key, img in image_keys(stack):
        ids[img] = engine.image_id(img) or ""
        if not ids[img]:
            raise ConfigError(stack.stack_file, key, f"image {img} is not in the local Docker "
                              "engine", "run image/build, or name a built image")
    return ids


class Supervisor:
    def __init__(self, prepared: Prepared, engine: Engine, log,
                 on_change: Callable[["Supervisor"], None] | None = None) -> None:
        self.prepared = prepared
        self.stack = prepared.stack
        self.engine = engine
        self.log = log
        self.layout = layout_of(self.stack)
        self.queue: queue.Queue = queue.Queue()
        self.records: dict[str, Record] = {}
        self.specs: dict[str, ContainerSpec] = {}
        self.deps = lifecycle.restart_dependencies(self.stack)
        self.dependents = lifecycle.dependents(self.deps)
        self.proxy = ProxyConfigurator(self)
        self.policy = self.stack.restart
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="docker")
        self.phase = "starting"  # starting, ready, degraded, stopping, stopped
        self.stop_requested = False
        self.fast_stop = False
        self.event_reconnects = 0
        self.started_monotonic = time.monotonic()
        self.ready_at: float | None = None
        self.on_change = on_change or (lambda s: None)
        self.on_ready: Callable[[Record], None] = lambda rec: None
        self.on_tick: Callable[[], None] = lambda: None  # the loop's heartbeat (watchdog)
        self.reload_requested = False
        self._closed = threading.Event()
        self._last_relist = time.monotonic()
        self.notify = NotifyListener(lambda inst, f: self.queue.put(NotifyMsg(inst, f)))
        self._events_thread: threading.Thread | None = None

    def adopt_prepared(self, prepared: Prepared, new_specs: dict[str, ContainerSpec]) -> None:
        """Take a re-read stack file as the one in force (reload)."""
        self.prepared = prepared
        self.stack = prepared.stack
        self.specs = new_specs
        self.deps = lifecycle.restart_dependencies(self.stack)
        self.dependents = lifecycle.dependents(self.deps)
        self.policy = self.stack.restart

    # --- setup ---------------------------------------------------------------------------

    def prepare_docker(self) -> None:
        """Write the state directory, make the network and volumes, then converge containers
        (adopt what matches, create what is missing, recreate what changed)."""
        self.specs = specs(self.prepared, local_images(self.engine, self.stack))
        changed = materialize(self.prepared)
        if changed:
            self.log.info("state_written", files=len(changed))
        self.engine.ensure_network(self.layout)
        if self.stack.postgres.mode == "managed":
            self.engine.ensure_volume(self.layout, self.layout.pg_volume)
        self.engine.ensure_volume(self.layout, self.layout.media_volume)
        for inst, spec in self.specs.items():
            self.records[inst] = Record(instance=inst, role=spec.role,
                                        state_since=time.monotonic())
            if spec.synapse:
                self.notify.add(inst, self.layout.notify_dir(inst), uid=SYNAPSE_UID)
        self._start_event_thread()
        self._converge()

    def _converge(self) -> None:
        found = self.engine.list_stack(self.stack.name)
        by_id = {c.container_id: c for c in found}
        observed = [Observed(c.instance, c.container_id, c.config_hash, c.running) for c in found]
        desired = {inst: spec.config_hash for inst, spec in self.specs.items()}
        plan = lifecycle.converge(desired, observed)
        for action in plan.actions:
            self.log.info("converge", action=action.kind, instance=action.instance,
                          reason=action.reason)
        # Removals first (orphans, duplicates, stale configs), workers before main.
        stale = [o for o in observed if o.instance not in desired or
                 o.config_hash != desired.get(o.instance)]
        order = {name: n for n, lv in enumerate(lifecycle.levels(self.dependents))
                 for name in lv}
        for obs in sorted(stale, key=lambda o: order.get(o.instance, -1)):
            if obs.running:
                self.engine.stop(obs.container_id, self.stack.restart.stop_timeout)
            self.engine.remove(obs.container_id)
        kept = {o.instance: by_id[o.container_id] for o in observed
                if desired.get(o.instance) == o.config_hash}
        for inst, spec in self.specs.items():
            rec = self.records[inst]
            info = kept.get(inst)
            if info is None:
                rec.container_id = self.engine.create(spec)
                self.log.info("created", instance=inst, container=rec.container_id[:12])
                continue
            rec.container_id = info.container_id
            rec.ip = info.ip
            if info.running:
                # Adopted without a restart: prove readiness by probing, not by notify.
                transition(rec, State.STARTING, time.monotonic(), "adopted running")
                rec.extra["adopted"] = True
                self._probe(rec)

    def _start_event_thread(self) -> None:
        since = time.time()

        def run() -> None:
            nonlocal since
            while not self._closed.is_set():
                try:
                    for ev in self.engine.events(self.stack.name, since=since):
                        since = ev.time_nano / 1e9
                        self.queue.put(DockerMsg(ev))
                        if self._closed.is_set():
                            return
                except Exception as err:  # the stream dropped: reconnect and relist
                    self.log.warning("event_stream_error", error=str(err)[:200])
                if self._closed.is_set():
                    return
                self.event_reconnects += 1
                self.queue.put(RelistMsg("event stream reconnected"))
                time.sleep(1.0)

        self._events_thread = threading.Thread(target=run, name="docker-events", daemon=True)
        self._events_thread.start()

    # --- start ---------------------------------------------------------------------------

    def start_stack(self) -> None:
        """Start tier by tier; each tier's members in parallel; wait until each is ready."""
        self.phase = "starting"
        t0 = time.monotonic()
        for tier in self.prepared.plan.start:
            tier_t0 = time.monotonic()
            self.log.info("tier_starting", tier=tier.name, members=list(tier.members))
            for inst in tier.members:
                rec = self.records[inst]
                if rec.state in (State.STOPPED, State.FAILED, State.WAITING, State.BACKOFF):
                    rec.attempts = 0  # a deliberate start gets the full number of attempts
                    self._start(rec, "stack start")
            critical = tier.name != "workers"
            timeout = self.stack.restart.main_ready_timeout if tier.name == "main" \
                else self.stack.restart.ready_timeout
            self._wait_tier(tier.members, critical, time.monotonic() + timeout)
            if self.stop_requested:
                return
            self.log.info("tier_ready", tier=tier.name,
                          seconds=round(time.monotonic() - tier_t0, 3))
        self.ready_at = time.monotonic()
        self._update_phase()
        self.log.info("stack_ready" if self.phase == "ready" else "stack_degraded",
                      seconds=round(self.ready_at - t0, 3),
                      ready=sum(r.state is State.READY for r in self.records.values()),
                      total=len(self.records))

    def _wait_tier(self, members, critical: bool, deadline: float) -> None:
        while True:
            recs = [self.records[m] for m in members]
            if all(r.state is State.READY for r in recs):
                return
            if not critical and all(r.state in (State.READY, State.FAILED) for r in recs):
                return
            if self.stop_requested:
                return
            if critical:
                bad = [r for r in recs if r.state in (State.BACKOFF, State.FAILED)]
                if bad or time.monotonic() > deadline:
                    rec = bad[0] if bad else next(r for r in recs if r.state is not State.READY)
                    why = (rec.extra.get("problem") or rec.last_exit_reason) if bad \
                        else "not ready in time"
                    lines = self.engine.last_lines(rec.container_id) if rec.container_id else []
                    for line in lines:
                        self.log.error("container_output", instance=rec.instance, line=line)
                    words = [ln.strip() for ln in lines if any(c.isalnum() for c in ln)]
                    raise StartFailed(f"{rec.instance} did not become ready ({why}); no later "
                                      f"tier was started. Last output: "
                                      f"{words[-1] if words else '(none)'}")
            self._pump(timeout=0.2)

    def _start(self, rec: Record, reason: str) -> None:
        spec = self.specs[rec.instance]
        if rec.instance == PROXY:
            self.proxy.write_initial()
        transition(rec, State.STARTING, time.monotonic(), reason)
        rec.extra.pop("notified", None)
        rec.extra.pop("adopted", None)
        rec.extra.pop("oom", None)  # an OOM flag belongs to the run that died
        rec.extra.pop("problem", None)
        rec.ip = None
        rec.extra["start_wall_ns"] = time.time_ns()  # older die events belong to older runs
        rec.extra["start_in_flight"] = True
        gen = rec.generation
        self.log.info("starting", instance=rec.instance, reason=reason,
                      container=(rec.container_id or "")[:12])
        container_id = rec.container_id

        def call() -> None:
            try:
                cid = container_id
                if cid is None or self.engine.inspect(cid) is None:
                    cid = self.engine.create(spec)
                    self.queue.put(CallMsg(lambda s, c=cid: setattr(rec, "container_id", c)))
                if self.stop_requested:
                    return  # the stack stops: leave it created, not running
                try:
                    self.engine.start(cid)
                except StaleTask as err:
                    cid = self._replace_container(rec, spec, cid, str(err))
                    if self.stop_requested:
                        return
                    self.engine.start(cid)
                info = self.engine.inspect(cid)
                self.queue.put(StartedMsg(rec.instance, gen, info.ip if info else None, None))
            except Exception as err:
                reachable = self.engine.ping()
                self.queue.put(StartedMsg(rec.instance, gen, None, str(err),
                                          docker_down=not reachable))

        self.pool.submit(call)
        self.on_change(self)

    def _replace_container(self, rec: Record, spec: ContainerSpec, old: str, why: str) -> str:
        """(Worker thread.) Remove a container the engine can no longer start and create it
        again from its spec; volumes are kept. The start call is still in flight meanwhile, so
        the old container's `destroy` event and a relist that misses it are not deaths."""
        self.log.warning("container_replaced", instance=rec.instance, container=old[:12],
                         reason=why[:200])
        self.engine.remove(old)
        cid = self.engine.create(spec)
        self.queue.put(CallMsg(lambda s, c=cid: setattr(rec, "container_id", c)))
        return cid

    def _probe(self, rec: Record) -> None:
        """Poll the honest readiness signal in a worker thread until it holds."""
        inst, gen, ip = rec.instance, rec.generation, rec.ip
        if ip is None:
            return
        if inst == POSTGRES:
            check = self._postgres_check(ip)
        elif inst == REDIS:
            check = lambda: probes.redis_answers(ip, 6379)  # noqa: E731
        elif inst == PROXY:
            check = lambda: probes.http_answers(f"http://{ip}:{CLIENT_PORT}/health")  # noqa: E731
        else:
            check = lambda: probes.synapse_ready(ip, CLIENT_PORT, METRICS_PORT)  # noqa: E731
        limit = time.monotonic() + max(self.stack.restart.ready_timeout,
                                       self.stack.restart.main_ready_timeout) + 5

        def run() -> None:
            while not self._closed.is_set() and rec.generation == gen and \
                    time.monotonic() < limit:
                result = check()
                if isinstance(result, tuple):
                    self.queue.put(ProbeMsg(inst, gen, False, result))
                    return
                if result:
                    self.queue.put(ProbeMsg(inst, gen, True))
                    return
                time.sleep(PROBE_INTERVAL)

        self.pool.submit(run)

    def _postgres_check(self, ip: str) -> Callable[[], bool | tuple[str, str]]:
        """Managed PostgreSQL is ready when the stack's role logs in with the stack's password.
        A rejected password is a problem no restart fixes: the image sets the password only
        when it initialises an empty data volume, so the volume remembers the first one."""
        pg, password = self.stack.postgres, self.prepared.inputs.postgres_password
        if not password:
            return lambda: probes.postgres_accepts(ip, 5432, pg.user, pg.database)
        volume = self.layout.pg_volume

        def check() -> bool | tuple[str, str]:
            answer, text = probes.postgres_login(ip, 5432, pg.user, pg.database, password)
            if answer == probes.PASSWORD_REJECTED:
                return "password rejected", (
                    f"PostgreSQL rejects the password in {self.stack.postgres_password_file}: "
                    f"volume {volume} was initialised with another one (fix: put back the "
                    "password file it was made with, or set the role's password to this one: "
                    "docs/recovery.md, Lost secrets)")
            if answer == probes.REFUSED:
                return "login refused", (
                    f"PostgreSQL refuses {pg.user}@{pg.database}: {text} (fix: see docker logs "
                    f"{self.layout.container(POSTGRES)} and docs/recovery.md)")
            return answer == probes.LOGGED_IN
        return check

    # --- the loop ------------------------------------------------------------------------

    def run_until_stopped(self) -> None:
        while not self.stop_requested:
            self._pump(timeout=1.0)

    def _pump(self, timeout: float) -> None:
        """Handle queued messages for up to `timeout` seconds, then the timers."""
        due = [r.retry_at for r in self.records.values() if r.retry_at is not None]
        now = time.monotonic()
        wait = max(0.0, min([timeout] + [d - now for d in due]))
        try:
            msg = self.queue.get(timeout=wait)
            self._handle(msg)
            while True:  # drain what else is there without waiting
                self._handle(self.queue.get_nowait())
        except queue.Empty:
            pass
        self._timers()
        self.on_tick()

    def _handle(self, msg) -> None:
        if isinstance(msg, DockerMsg):
            self._on_docker(msg.event)
        elif isinstance(msg, NotifyMsg):
            self._on_notify(msg)
        elif isinstance(msg, StartedMsg):
            self._on_started(msg)
        elif isinstance(msg, ProbeMsg):
            self._on_probe(msg)
        elif isinstance(msg, RelistMsg):
            self._relist(msg.reason)
        elif isinstance(msg, ProxyMsg):
            self.proxy.done(msg)
        elif isinstance(msg, CallMsg):
            try:
                msg.reply.put((True, msg.func(self)))
            except Exception as err:  # reported to the caller, never kills the loop
                msg.reply.put((False, err))

    def _timers(self) -> None:
        now = time.monotonic()
        for rec in self.records.values():
            if self.stop_requested or self.phase == "stopping":
                break  # nothing is (re)started while the stack stops
            if rec.state is State.BACKOFF and rec.retry_at is not None and now >= rec.retry_at:
                if self._deps_ready(rec.instance):
                    if not rec.extra.pop("start_retry", False):  # a retry is not a restart
                        rec.restarts += 1
                    self._start(rec, f"restart after {rec.last_exit_reason}")
                else:
                    transition(rec, State.WAITING, now, "a dependency is not ready")
                    rec.retry_at = None
                    self.log.info("waiting", instance=rec.instance,
                                  on=[d for d in self.deps[rec.instance]
                                      if self.records[d].state is not State.READY])
            elif rec.state is State.STARTING and rec.started_at is not None and \
                    not self.stop_requested:
                limit = self.stack.restart.main_ready_timeout if rec.instance == MAIN else \
                    self.stack.restart.ready_timeout
                if now - rec.started_at > limit and rec.container_id and \
                        not rec.extra.get("timed_out"):
                    rec.extra["timed_out"] = True
                    self.log.warning("ready_timeout", instance=rec.instance, seconds=limit)
                    self.pool.submit(self.engine.kill, rec.container_id)
        if now - self._last_relist > RELIST_EVERY:
            self._relist("periodic")
        self.proxy.maybe_reload()

    @staticmethod
    def _start_pending(rec: Record) -> bool:
        """Its start call has not returned: the container may be being created or replaced,
        so what Docker shows of it now is not news about its run."""
        return rec.state is State.STARTING and bool(rec.extra.get("start_in_flight"))

    def _deps_ready(self, inst: str) -> bool:
        return all(self.records[d].state is State.READY for d in self.deps[inst])

    # --- handlers --------------------------------------------------------------------------

    def _record_for(self, ev: ContainerEvent) -> Record | None:
        rec = self.records.get(ev.instance)
        if rec is None or (rec.container_id and ev.container_id != rec.container_id):
            return None
        return rec

    def _on_docker(self, ev: ContainerEvent) -> None:
        rec = self._record_for(ev)
        if rec is None:
            return
        if ev.action in ("oom", "die") and ev.time_nano < rec.extra.get("start_wall_ns", 0):
            return  # news of a run before our latest start call
        if ev.action == "oom":
            rec.extra["oom"] = True
        elif ev.action == "die":
            self._on_death(rec, ev.exit_code)
        elif ev.action == "destroy":
            if self._start_pending(rec):
                return  # removed by its own start call (replaced); the new ID is on the way
            rec.container_id = None
            if rec.state in (State.READY, State.STARTING):
                self._on_death(rec, None)

    def _on_death(self, rec: Record, exit_code: int | None) -> None:
        if rec.state not in (State.STARTING, State.READY):
            return  # expected (stopping) or already handled
        try:
            info = self.engine.inspect(rec.container_id) if rec.container_id else None
        except Exception as err:  # Docker unreachable: judge from the event alone
            self.log.warning("inspect_failed", instance=rec.instance, error=str(err)[:200])
            info = None
        if info is not None and info.running and not rec.extra.get("timed_out"):
            return  # a stale event: the container runs (again)
        oom = bool(info and info.oom_killed) or rec.extra.pop("oom", False)
        code = info.exit_code if info else exit_code
        if not oom and code == 137 and rec.container_id:
            # Docker misses some on cgroup v1; only a kill during this run counts
            oom = kernel_oom_killed(rec.container_id, since=rec.started_at)
        rec.last_exit_code = code
        rec.last_exit_reason = "ready timeout" if rec.extra.pop("timed_out", False) else \
            exit_reason(code, oom)
        now = time.monotonic()
        was_ready = rec.state is State.READY
        record_death(rec, self.policy, now, was_ready)
        self.log.warning("died", instance=rec.instance, container=(rec.container_id or "")[:12],
                         reason=rec.last_exit_reason, was_ready=was_ready, attempts=rec.attempts)
        if not was_ready and rec.attempts >= self.policy.max_attempts:
            transition(rec, State.FAILED, now, f"died {rec.attempts} times before ready")
            try:
                lines = self.engine.last_lines(rec.container_id or "", 5)
            except Exception:
                lines = []
            for line in lines:
                self.log.error("container_output", instance=rec.instance, line=line)
            self.log.error("failed", instance=rec.instance, attempts=rec.attempts,
                           reason=rec.last_exit_reason)
        else:
            rec.backoff_delay = next_delay(self.policy, rec.attempts)
            transition(rec, State.BACKOFF, now, rec.last_exit_reason)
            rec.retry_at = now + rec.backoff_delay
            self.log.info("backoff", instance=rec.instance, seconds=round(rec.backoff_delay, 3))
        self._update_phase()

    def _on_notify(self, msg: NotifyMsg) -> None:
        rec = self.records.get(msg.instance)
        if rec is None:
            return
        if msg.fields.get("READY") == "1" and rec.state is State.STARTING:
            rec.extra["notified"] = rec.generation
            self.log.info("listening", instance=rec.instance)
            self._probe(rec)

    def _on_started(self, msg: StartedMsg) -> None:
        rec = self.records[msg.instance]
        if msg.generation != rec.generation or rec.state is not State.STARTING:
            return
        rec.extra.pop("start_in_flight", None)
        if msg.error and msg.docker_down:
            # dockerd is away (restarting?): try again without counting it against the container
            self.log.warning("docker_unreachable", instance=rec.instance, error=msg.error[:200])
            self._retry_start(rec, DOCKER_RETRY, "Docker engine unreachable")
            return
        if msg.error:
            # The start call itself was refused (engine shutting down, a mount or port
            # problem): not a death of the container. Back off and retry, growing the delay,
            # without spending its restart attempts.
            errors = rec.extra.get("start_errors", 0) + 1
            rec.extra["start_errors"] = errors
            rec.last_exit_reason = f"start refused: {msg.error[:120]}"
            self.log.error("start_failed", instance=rec.instance, error=msg.error, tries=errors)
            self._retry_start(rec, next_delay(self.policy, errors + 1), rec.last_exit_reason)
            self._update_phase()
            return
        rec.ip = msg.ip
        # Synapse: wait for its own READY=1 before probing replication.
        if not self.specs[rec.instance].synapse or rec.extra.get("notified") == rec.generation:
            self._probe(rec)

    def _retry_start(self, rec: Record, delay: float, why: str) -> None:
        """Make the start call again after `delay`: a retry, not a restart (not counted, and
        no restart attempt spent)."""
        now = time.monotonic()
        transition(rec, State.BACKOFF, now, why)
        rec.backoff_delay = delay
        rec.retry_at = now + delay
        rec.extra["start_retry"] = True

    def _on_probe(self, msg: ProbeMsg) -> None:
        rec = self.records[msg.instance]
        if msg.generation != rec.generation or rec.state is not State.STARTING:
            return
        if msg.problem:
            rec.last_exit_reason, rec.extra["problem"] = msg.problem
            transition(rec, State.FAILED, time.monotonic(), msg.problem[0])
            self.log.error("failed", instance=rec.instance, reason=msg.problem[0],
                           problem=msg.problem[1])
            self._update_phase()
            return
        if not msg.ok:
            return
        transition(rec, State.READY, time.monotonic(), "ready")
        rec.extra.pop("start_errors", None)
        self.log.info("ready", instance=rec.instance, container=(rec.container_id or "")[:12],
                      seconds=round(rec.last_time_to_ready or 0, 3))
        if not rec.extra.get("adopted"):
            self.on_ready(rec)
        # Whoever waited for this dependency may go now.
        for dep in self.dependents.get(rec.instance, ()):
            d = self.records[dep]
            if d.state is State.WAITING and self._deps_ready(dep) and not self.stop_requested:
                self._start(d, f"{rec.instance} is ready again")
        self._update_phase()

    def _relist(self, reason: str) -> None:
        self._last_relist = time.monotonic()
        try:
            found = {c.container_id: c for c in self.engine.list_stack(self.stack.name)}
        except Exception as err:
            self.log.warning("relist_failed", error=str(err)[:200])
            return
        for rec in self.records.values():
            if self._start_pending(rec):
                continue  # its start call (maybe creating or replacing it) has not returned
            info = found.get(rec.container_id or "")
            if rec.state in (State.READY, State.STARTING) and (info is None or
                                                              info.status == "exited"):
                if rec.state is State.STARTING and info is not None and info.status == "created":
                    continue
                self.log.info("relist_found_dead", instance=rec.instance, reason=reason)
                if info is None:
                    rec.container_id = None
                self._on_death(rec, info.exit_code if info else None)

    def _update_phase(self) -> None:
        self.proxy.changed()
        if self.phase in ("stopping", "stopped"):
            pass
        elif all(r.state is State.READY for r in self.records.values()):
            self.phase = "ready"
        elif self.ready_at is not None:
            self.phase = "degraded"
        self.on_change(self)

    # --- stop ----------------------------------------------------------------------------

    def request_stop(self, fast: bool = False) -> None:
        if self.stop_requested:
            self.fast_stop = True
        self.stop_requested = True
        self.fast_stop = self.fast_stop or fast
        self.queue.put(WakeMsg())

    def stop_stack(self, tiers=None) -> None:
        """Stop tier by tier: workers (in parallel), main, then PostgreSQL and Redis.
        Volumes are never removed."""
        if tiers is not None and not any(t.members for t in tiers):
            return  # nothing to stop (e.g. a reload that only adds workers)
        self.phase = "stopping"
        self.on_change(self)
        t0 = time.monotonic()
        for tier in (self.prepared.plan.stop if tiers is None else tiers):
            recs = [r for r in (self.records.get(m) for m in tier.members)
                    if r is not None and r.container_id and r.state is not State.STOPPED]
            if not recs:
                continue
            now = time.monotonic()
            for rec in recs:
                rec.retry_at = None
                transition(rec, State.STOPPING, now, "stack stop")
            self.log.info("tier_stopping", tier=tier.name, members=[r.instance for r in recs])
            timeout = 1.0 if self.fast_stop else self.stack.restart.stop_timeout
            futures = {self.pool.submit(self.engine.stop, r.container_id, timeout): r
                       for r in recs}
            killed = self.fast_stop
            while not all(f.done() for f in futures):
                self._pump(0.1)  # status requests and the watchdog go on during a stop
                if self.fast_stop and not killed:
                    killed = True
                    for r in recs:
                        self.engine.kill(r.container_id)
            for rec in recs:
                transition(rec, State.STOPPED, time.monotonic(), "stopped")
            self.log.info("tier_stopped", tier=tier.name)
        if all(r.state is State.STOPPED for r in self.records.values()):
            self.phase = "stopped"
            self.log.info("stack_stopped", seconds=round(time.monotonic() - t0, 3))
        self.on_change(self)

    def close(self) -> None:
        self._closed.set()
        self.notify.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


class ProxyConfigurator:
    """Keeps the proxy's routing in step with which Synapse instances are ready: render, write
    `nginx.conf.new`, `nginx -t` it inside the container, then swap it in and SIGHUP (a reload,
    not a restart). A config nginx refuses is reported and the running proxy keeps the old one.
    nginx resolves upstream names when it loads a config, so it reloads whenever the set of
    ready instances or any of their runs changed (a restarted container may have a new
    address). One reload at a time; changes that arrive meanwhile are coalesced."""

    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.dirty = False
        self.in_flight = False
        self.applied: tuple | None = None

    @property
    def enabled(self) -> bool:
        return self.sup.stack.has_proxy and PROXY in self.sup.records

    def down(self, extra: frozenset[str] = frozenset()) -> frozenset[str]:
        return frozenset(i.name for i in self.sup.stack.instances
                         if self.sup.records[i.name].state is not State.READY) | extra

    def _key(self, text: str) -> tuple:
        return text, tuple(sorted((i.name, self.sup.records[i.name].generation)
                                  for i in self.sup.stack.instances))

    def write_initial(self) -> None:
        from .statedir import write_shared
        text = proxy_config.render_nginx(self.sup.stack, self.down())
        write_shared(self.sup.layout.proxy_dir / proxy_config.CONFIG_FILE, text,
                     proxy_config.PROXY_UID)
        self.applied = self._key(text)
        self.dirty = False

    def changed(self) -> None:
        if self.enabled:
            self.dirty = True

    def _proxy_container(self) -> str | None:
        rec = self.sup.records.get(PROXY)
        if rec is None or rec.state is not State.READY:
            return None
        return rec.container_id

    def maybe_reload(self) -> None:
        if not (self.enabled and self.dirty and not self.in_flight):
            return
        cid = self._proxy_container()
        if cid is None:
            return
        self.dirty = False
        text = proxy_config.render_nginx(self.sup.stack, self.down())
        key = self._key(text)
        if key == self.applied:
            return
        self.in_flight = True
        directory, engine = self.sup.layout.proxy_dir, self.sup.engine
        self.sup.pool.submit(lambda: self.sup.queue.put(
            ProxyMsg(key, self._apply(engine, cid, directory, text))))

    def take_out(self, instances: set[str]) -> None:
        """Before a deliberate stop: route around these instances now (Synapse does not drain)."""
        cid = self._proxy_container() if self.enabled else None
        if cid is None:
            return
        while self.in_flight:  # let a background reload finish: both write nginx.conf.new
            self.sup._pump(0.05)
        text = proxy_config.render_nginx(self.sup.stack, self.down(frozenset(instances)))
        error = self._apply(self.sup.engine, cid, self.sup.layout.proxy_dir, text)
        self.done(ProxyMsg(self._key(text), error))

    @staticmethod
    def _apply(engine, cid: str, directory, text: str) -> str | None:
        from .statedir import write_shared
        try:
            new = directory / (proxy_config.CONFIG_FILE + ".new")
            write_shared(new, text, proxy_config.PROXY_UID)
            code, out = engine.exec(cid, proxy_config.TEST_COMMAND[:-1] +
                                    (proxy_config.CONFIG_PATH + ".new",))
            if code != 0:  # nginx -t's own words, e.g. "[emerg] host not found in upstream"
                lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
                return " | ".join(lines[:3]) or f"nginx -t exit {code}"
            new.replace(directory / proxy_config.CONFIG_FILE)
            engine.kill(cid, proxy_config.RELOAD_SIGNAL)
            return None
        except Exception as err:
            return str(err)

    def done(self, msg: "ProxyMsg") -> None:
        self.in_flight = False
        if msg.error:
            self.sup.log.error("proxy_reload_refused", error=msg.error[:300])
        else:
            self.applied = msg.key
            self.sup.log.info("proxy_reloaded", down=sorted(self.down()))


def install_signal_handlers(sup: Supervisor) -> None:
    def handler(signum, frame) -> None:
        sup.log.info("signal", signal=signal.Signals(signum).name,
                     again=sup.stop_requested)
        sup.request_stop()

    def reload_handler(signum, frame) -> None:
        sup.reload_requested = True
        sup.queue.put(WakeMsg())

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGHUP, reload_handler)
