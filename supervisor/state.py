"""One state machine per container, and the crash backoff.

States (docs/states.md draws them):
  STOPPED  -> STARTING   start requested
  STARTING -> READY      listening and replicating (or, for PostgreSQL/Redis, serving)
  STARTING -> BACKOFF    died or timed out before ready; retried after a growing delay
                         (the first retry is immediate, then initial_delay, doubling, capped)
  STARTING -> FAILED     died before ready `max_attempts` times in a row: waits for an operator
  READY    -> BACKOFF    died after being ready (counts from 1 again once it was stable)
  BACKOFF  -> STARTING   the delay is over
  BACKOFF  -> WAITING    a dependency is down: held until it is ready again
  WAITING  -> STARTING   the dependency is ready
  any      -> STOPPING   stop requested;  STOPPING -> STOPPED  it exited
Every change goes through `transition`, which checks the edge and returns the event to log.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from .stack import RestartPolicy


class State(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    WAITING = "waiting"
    FAILED = "failed"
    STOPPING = "stopping"


ALLOWED: dict[State, set[State]] = {
    State.STOPPED: {State.STARTING, State.STOPPING, State.WAITING},
    State.STARTING: {State.READY, State.BACKOFF, State.FAILED, State.STOPPING, State.WAITING},
    State.READY: {State.BACKOFF, State.STOPPING, State.WAITING, State.STARTING},
    State.BACKOFF: {State.STARTING, State.WAITING, State.STOPPING, State.FAILED},
    State.WAITING: {State.STARTING, State.STOPPING},
    State.FAILED: {State.STARTING, State.STOPPING},
    State.STOPPING: {State.STOPPED},
}


class TransitionError(RuntimeError):
    pass


@dataclass
class Record:
    """What the daemon knows of one instance."""

    instance: str
    role: str
    state: State = State.STOPPED
    container_id: str | None = None
    ip: str | None = None
    attempts: int = 0  # consecutive deaths without becoming stably ready
    restarts: int = 0  # restarts after a crash, since the daemon started
    last_exit_code: int | None = None
    last_exit_reason: str | None = None  # "exit code 1", "OOM-killed", "signal 9 (SIGKILL)"
    state_since: float = 0.0
    ready_since: float | None = None
    started_at: float | None = None  # monotonic, last start call
    retry_at: float | None = None
    generation: int = 0  # bumps on every start; stale probe results are ignored
    backoff_delay: float = 0.0
    last_time_to_ready: float | None = None
    extra: dict = field(default_factory=dict)


def transition(record: Record, new: State, now: float, reason: str = "") -> dict:
    if new not in ALLOWED[record.state] and new != record.state:
        raise TransitionError(f"{record.instance}: {record.state.value} -> {new.value} is not "
                              f"allowed (from {record.state.value} only "
                              f"{', '.join(sorted(s.value for s in ALLOWED[record.state]))})")
    old = record.state
    record.state = new
    record.state_since = now
    if new is State.READY:
        record.ready_since = now
        if record.started_at is not None:
            record.last_time_to_ready = now - record.started_at
    elif old is State.READY:
        record.ready_since = None
    if new is State.STARTING:
        record.generation += 1
        record.started_at = now
        record.retry_at = None
    return {"event": "state", "instance": record.instance, "from": old.value, "to": new.value,
            "reason": reason}


def exit_reason(exit_code: int | None, oom_killed: bool) -> str:
    if oom_killed:
        return "OOM-killed"
    if exit_code is None:
        return "unknown"
    if exit_code > 128:
        import signal as _signal
        try:
            name = _signal.Signals(exit_code - 128).name
        except ValueError:
            name = "?"
        return f"signal {exit_code - 128} ({name})"
    return f"exit code {exit_code}"


def next_delay(policy: RestartPolicy, attempt: int, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (1-based): none for the first, then
    initial_delay * multiplier^(attempt-2), capped at max_delay, spread by +-jitter so crashed
    containers do not retry in lockstep."""
    if attempt <= 1:
        return 0.0  # the first death after a stable run (or the first ever): restart at once
    base = min(policy.max_delay,
               policy.initial_delay * policy.multiplier ** max(0, attempt - 2))
    spread = (rng or random).uniform(-policy.jitter, policy.jitter)
    return max(0.0, base * (1 + spread))


def record_death(record: Record, policy: RestartPolicy, now: float, was_ready: bool) -> None:
    """Count a death: a container that was ready for `stable_after` starts counting afresh."""
    stable = was_ready and record.ready_since is not None and \
        now - record.ready_since >= policy.stable_after
    record.attempts = 1 if stable else record.attempts + 1
