"""Event histories replayed through the real supervisor loop, with a scripted engine.

Probes are replaced by "always ready" (no network); Synapse readiness still arrives as READY=1
on the real notify sockets. What is asserted is the runbook: order, waiting, backoff, failure.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import structlog

from supervisor import loop as loop_mod
from supervisor.errors import StartFailed
from supervisor.loop import Supervisor
from supervisor.prepare import prepare
from supervisor.state import State
from tests.unit.conftest import edit_yaml
from tests.unit.fake_engine import FakeEngine

WORKERS = ["sync-1", "event-persister-1"]


@pytest.fixture
def make(stack_dir, monkeypatch):
    monkeypatch.setattr(loop_mod.probes, "postgres_accepts", lambda *a, **k: True)
    monkeypatch.setattr(loop_mod.probes, "postgres_login",
                        lambda *a, **k: (loop_mod.probes.LOGGED_IN, ""))
    monkeypatch.setattr(loop_mod.probes, "redis_answers", lambda *a, **k: True)
    monkeypatch.setattr(loop_mod.probes, "synapse_ready", lambda *a, **k: True)
    monkeypatch.setattr(loop_mod.probes, "http_answers", lambda *a, **k: True)
    edit_yaml(stack_dir / "stack.yaml", lambda d: d.update(
        workers={"sync": 1, "event_persister": 1},
        restart={"initial_delay": 0.05, "max_delay": 0.2, "max_attempts": 3,
                 "ready_timeout": 5, "main_ready_timeout": 5}))
    made = []

    def build(behaviour=None):
        prepared = prepare(stack_dir / "stack.yaml")
        engine = FakeEngine(prepared.stack.state_dir, behaviour)
        sup = Supervisor(prepared, engine, structlog.get_logger())
        sup.prepare_docker()
        made.append((sup, engine))
        return sup, engine

    yield build
    for sup, engine in made:
        engine._events.put(None)
        sup.close()


def pump_until(sup, cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        sup._pump(0.05)
    raise AssertionError({r.instance: r.state.value for r in sup.records.values()})


def test_start_goes_infrastructure_then_main_then_workers_then_proxy(make):
    sup, engine = make()
    sup.start_stack()
    assert sup.phase == "ready"
    started = engine.started()
    assert set(started[:2]) == {"postgres", "redis"} and started[2] == "main"
    assert set(started[3:5]) == set(WORKERS) and started[5:] == ["proxy"]
    conf = (sup.layout.proxy_dir / "nginx.conf").read_text()
    assert "sync-1:8008" in conf  # rendered with every worker ready


def test_main_dying_before_ready_fails_the_start_and_starts_no_worker(make):
    sup, engine = make({"main": ["die"]})
    with pytest.raises(StartFailed, match="main did not become ready.*exit code 1"):
        sup.start_stack()
    assert not set(engine.started()) & set(WORKERS)


def test_crash_looping_worker_is_failed_after_max_attempts_rest_stays_ready(make):
    sup, engine = make({"sync-1": ["die"]})
    sup.start_stack()
    sync = sup.records["sync-1"]
    assert sync.state is State.FAILED and sync.attempts == 3
    assert sync.last_exit_reason == "exit code 1"
    assert engine.started().count("sync-1") == 3
    assert sup.records["event-persister-1"].state is State.READY
    assert sup.phase == "degraded"


def test_killed_worker_is_restarted_with_backoff_and_counted(make):
    sup, engine = make()
    sup.start_stack()
    engine.die("sync-1", 137)
    pump_until(sup, lambda: sup.records["sync-1"].state is State.READY
               and sup.records["sync-1"].restarts == 1)
    assert sup.records["sync-1"].last_exit_reason == "signal 9 (SIGKILL)"
    assert engine.started().count("main") == 1


def test_worker_dying_while_main_is_down_waits_for_main(make):
    sup, engine = make({"main": ["ok", "hang", "ok"]})
    sup.start_stack()
    engine.die("main", 137)
    pump_until(sup, lambda: sup.records["main"].state is State.STARTING
               and sup.records["main"].restarts == 1)
    engine.die("sync-1", 1)
    pump_until(sup, lambda: sup.records["sync-1"].state is State.WAITING, timeout=3)
    starts_before = engine.started().count("sync-1")
    # main hangs on this start: it times out, is killed, restarted, and only then sync-1 goes
    pump_until(sup, lambda: sup.records["main"].state is State.READY, timeout=15)
    pump_until(sup, lambda: sup.records["sync-1"].state is State.READY)
    calls = engine.started()
    last_main = max(i for i, inst in enumerate(calls) if inst == "main")
    first_sync_after = min(i for i, inst in enumerate(calls)
                           if inst == "sync-1" and i > last_main)
    assert first_sync_after > last_main
    assert engine.started().count("sync-1") == starts_before + 1


def test_proxy_is_reloaded_around_a_dead_worker(make):
    sup, engine = make()
    sup.start_stack()
    engine.die("sync-1", 137)
    pump_until(sup, lambda: any("nginx.conf.new" in c for k, c in engine.calls if k == "exec"))
    conf = (sup.layout.proxy_dir / "nginx.conf").read_text()
    assert "sync-1:8008" not in conf  # routed around while it restarts
    pump_until(sup, lambda: sup.records["sync-1"].state is State.READY and not sup.proxy.in_flight
               and "sync-1:8008" in (sup.layout.proxy_dir / "nginx.conf").read_text())


def test_oom_is_reported_as_such(make):
    sup, engine = make()
    sup.start_stack()
    engine.die("event-persister-1", 137, oom=True)
    pump_until(sup, lambda: sup.records["event-persister-1"].last_exit_reason is not None)
    assert sup.records["event-persister-1"].last_exit_reason == "OOM-killed"


def test_stop_goes_workers_then_main_then_infrastructure(make):
    sup, engine = make()
    sup.start_stack()
    engine.calls.clear()
    sup.stop_stack()
    stops = [inst for call, inst in engine.calls if call == "stop"]
    assert stops[0] == "proxy"
    assert set(stops[1:3]) == set(WORKERS) and stops[3] == "main"
    assert set(stops[4:]) == {"postgres", "redis"}
    assert sup.phase == "stopped"


def test_engine_away_is_not_counted_against_the_container(make, monkeypatch):
    sup, engine = make()
    sup.start_stack()
    real_start = engine.start
    back_at = time.monotonic() + 0.5  # dockerd "restarts" for half a second
    refused = []

    def start(cid):
        if time.monotonic() < back_at:
            refused.append(cid)
            raise ConnectionError("dockerd is restarting")
        real_start(cid)

    engine.start = start
    engine.ping = lambda: time.monotonic() >= back_at
    monkeypatch.setattr(loop_mod, "DOCKER_RETRY", 0.05)
    engine.die("sync-1", 143)
    pump_until(sup, lambda: sup.records["sync-1"].state is State.READY
               and sup.records["sync-1"].restarts >= 1, timeout=10)
    assert len(refused) >= 2
    assert sup.records["sync-1"].attempts == 1  # the death only, not the refused starts
    assert sup.records["sync-1"].restarts == 1


def test_refused_start_calls_back_off_without_spending_attempts(make, monkeypatch):
    sup, engine = make()
    sup.start_stack()
    real_start = engine.start
    refusals = {"left": 7}

    def start(cid):
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise RuntimeError("Cannot start container: daemon is shutting down")
        real_start(cid)

    engine.start = start
    monkeypatch.setattr(sup, "policy", replace(sup.policy, initial_delay=0.01, max_delay=0.05))
    engine.die("sync-1", 143)
    pump_until(sup, lambda: sup.records["sync-1"].state is State.READY
               and refusals["left"] == 0, timeout=10)
    assert sup.records["sync-1"].attempts == 1  # 7 refusals > max_attempts, never failed
    assert sup.records["sync-1"].restarts == 1


def test_container_whose_task_outlived_dockerd_is_replaced(make):
    # After a start raced dockerd's shutdown, every start is refused with "task <id>: already
    # exists": the container is removed and created again from its spec, and its destroy
    # event is not taken for a death.
    sup, engine = make({"main": ["ok", "stale", "ok"]})
    sup.start_stack()
    old = sup.records["main"].container_id
    real_create = engine.create

    def slow_create(spec):  # the old container's destroy event arrives before the new ID
        if spec.instance == "main":
            time.sleep(0.3)
        return real_create(spec)

    engine.create = slow_create
    sup._last_relist = 0.0  # and a periodic relist runs meanwhile
    engine.die("main", 143)
    pump_until(sup, lambda: sup.records["main"].state is State.READY
               and sup.records["main"].container_id != old)
    rec = sup.records["main"]
    assert rec.state is State.READY and rec.restarts == 1 and rec.attempts == 1
    assert ("remove", old) in engine.calls
    assert [i.instance for i in engine.containers.values()].count("main") == 1
    assert engine.inspect(rec.container_id).running
    assert [c for c in engine.calls if c[0] == "create"].count(("create", "main")) == 2


def test_an_oom_flag_does_not_outlive_its_run(make):
    sup, engine = make()
    sup.start_stack()
    rec = sup.records["sync-1"]
    killed_at = time.time_ns()
    engine.die("sync-1", 137)  # Docker's State.OOMKilled missed it; its oom event comes late
    pump_until(sup, lambda: rec.state is State.READY and rec.restarts == 1)
    sup.queue.put(loop_mod.DockerMsg(loop_mod.ContainerEvent(
        "oom", rec.container_id, "sync-1", None, killed_at)))
    sup._pump(0.05)
    assert "oom" not in rec.extra  # it belongs to the run before the restart
    engine.die("sync-1", 137)
    pump_until(sup, lambda: rec.state is State.READY and rec.restarts == 2)
    assert rec.last_exit_reason == "signal 9 (SIGKILL)"
    sup.queue.put(loop_mod.DockerMsg(loop_mod.ContainerEvent(
        "oom", rec.container_id, "sync-1", None, time.time_ns())))
    engine.die("sync-1", 137)
    pump_until(sup, lambda: rec.state is State.READY and rec.restarts == 3)
    assert rec.last_exit_reason == "OOM-killed"


def test_a_password_postgres_rejects_fails_the_start_with_the_fix(make, monkeypatch):
    seen = []

    def login(host, port, user, database, password):
        seen.append((user, database, password))
        return loop_mod.probes.PASSWORD_REJECTED, "password authentication failed"

    monkeypatch.setattr(loop_mod.probes, "postgres_login", login)
    sup, engine = make()
    with pytest.raises(StartFailed, match="postgres did not become ready \\(PostgreSQL rejects "
                       "the password in .*postgres_password: volume .*-pgdata was initialised"):
        sup.start_stack()
    assert seen and seen[0][2] == sup.prepared.inputs.postgres_password
    assert len(seen) == 1  # no retry helps: asked once
    assert sup.records["postgres"].state is State.FAILED
    assert sup.records["postgres"].last_exit_reason == "password rejected"  # short: a label
    assert "main" not in engine.started()


def test_an_oom_flag_docker_confirmed_is_not_carried_into_the_next_run(make):
    sup, engine = make()
    sup.start_stack()
    rec = sup.records["sync-1"]
    sup.queue.put(loop_mod.DockerMsg(loop_mod.ContainerEvent(
        "oom", rec.container_id, "sync-1", None, time.time_ns())))
    sup._pump(0.05)
    engine.die("sync-1", 137, oom=True)  # Docker says OOMKilled: the event's flag is not read
    pump_until(sup, lambda: rec.state is State.READY and rec.restarts == 1)
    assert rec.last_exit_reason == "OOM-killed"
    engine.containers[rec.container_id] = replace(engine.containers[rec.container_id],
                                                  oom_killed=False)
    engine.die("sync-1", 137)  # a plain SIGKILL of the new run
    pump_until(sup, lambda: rec.state is State.READY and rec.restarts == 2)
    assert rec.last_exit_reason == "signal 9 (SIGKILL)"
