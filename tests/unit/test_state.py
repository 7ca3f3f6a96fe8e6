"""The per-container state machine and the crash backoff, tested by edge."""

from __future__ import annotations

import random

import pytest

from supervisor.stack import RestartPolicy
from supervisor.state import (Record, State, TransitionError, exit_reason,
                              next_delay, record_death, transition)


def rec(state=State.STOPPED):
    r = Record("sync-1", "sync")
    r.state = state
    return r


def test_transition_stopped_to_starting_bumps_generation():
    r = rec()
    event = transition(r, State.STARTING, 10.0, "stack start")
    assert r.generation == 1 and r.started_at == 10.0
    assert event == {"event": "state", "instance": "sync-1", "from": "stopped",
                     "to": "starting", "reason": "stack start"}


def test_transition_starting_to_ready_measures_time_to_ready():
    r = rec()
    transition(r, State.STARTING, 10.0)
    transition(r, State.READY, 12.5)
    assert r.last_time_to_ready == 2.5 and r.ready_since == 12.5


def test_transition_ready_to_backoff_clears_ready_since():
    r = rec()
    transition(r, State.STARTING, 0.0)
    transition(r, State.READY, 1.0)
    transition(r, State.BACKOFF, 5.0)
    assert r.ready_since is None


@pytest.mark.parametrize("start,to", [
    (State.STOPPED, State.READY),       # never ready without starting
    (State.STOPPING, State.STARTING),   # a stop finishes first
    (State.FAILED, State.READY),
    (State.WAITING, State.READY),
])
def test_forbidden_edges_name_the_allowed_ones(start, to):
    r = rec(start)
    with pytest.raises(TransitionError, match=f"{start.value} -> {to.value} is not allowed"):
        transition(r, to, 0.0)


def test_backoff_doubles_and_caps_without_jitter():
    p = RestartPolicy(initial_delay=1, max_delay=10, multiplier=2, jitter=0)
    assert [next_delay(p, n) for n in range(1, 8)] == [0, 1, 2, 4, 8, 10, 10]


def test_backoff_jitter_stays_within_bounds():
    p = RestartPolicy(initial_delay=4, max_delay=60, multiplier=2, jitter=0.25)
    rng = random.Random(7)
    delays = [next_delay(p, 2, rng) for _ in range(200)]
    assert min(delays) >= 3.0 and max(delays) <= 5.0 and len(set(delays)) > 100


def test_death_after_a_stable_run_counts_from_one():
    p = RestartPolicy(stable_after=60)
    r = rec()
    r.attempts = 4
    r.ready_since = 0.0
    record_death(r, p, now=61.0, was_ready=True)
    assert r.attempts == 1


def test_death_soon_after_ready_keeps_counting():
    p = RestartPolicy(stable_after=60)
    r = rec()
    r.attempts = 2
    r.ready_since = 50.0
    record_death(r, p, now=61.0, was_ready=True)
    assert r.attempts == 3


@pytest.mark.parametrize("code,oom,expected", [
    (137, False, "signal 9 (SIGKILL)"),
    (143, False, "signal 15 (SIGTERM)"),
    (1, False, "exit code 1"),
    (137, True, "OOM-killed"),
    (None, False, "unknown"),
])
def test_exit_reason(code, oom, expected):
    assert exit_reason(code, oom) == expected
