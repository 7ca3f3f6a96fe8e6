"""The ordering runbook as tables: tiers to start, tiers to stop, what to restore, converge."""

from __future__ import annotations

import pytest

from supervisor import lifecycle
from supervisor.lifecycle import Observed
from supervisor.prepare import prepare
from tests.unit.conftest import edit_yaml


def stack_with(stack_dir, **changes):
    edit_yaml(stack_dir / "stack.yaml", lambda d: d.update(changes))
    return prepare(stack_dir / "stack.yaml").stack


def tiers(ts):
    return [(t.name, list(t.members)) for t in ts]


PLANS = {
    "default stack: infra, main, all workers in one tier, then the proxy": (
        {},
        [("infrastructure", ["postgres", "redis"]), ("main", ["main"]),
         ("workers", ["sync-1", "client-reader-1", "federation-reader-1",
                      "federation-sender-1", "event-persister-1", "media-repository-1"]),
         ("proxy", ["proxy"])]),
    "no proxy: the workers tier is last": (
        {"proxy": {"mode": "none"}, "workers": {"sync": 2}},
        [("infrastructure", ["postgres", "redis"]), ("main", ["main"]),
         ("workers", ["sync-1", "sync-2"])]),
    "no workers: infra then main, then the proxy": (
        {"workers": {}}, [("infrastructure", ["postgres", "redis"]), ("main", ["main"]),
                          ("proxy", ["proxy"])]),
    "external postgres: only redis is infrastructure": (
        {"postgres": {"mode": "external", "host": "db.internal", "password_file":
                      "secrets/postgres_password"}, "workers": {"sync": 2}},
        [("infrastructure", ["redis"]), ("main", ["main"]), ("workers", ["sync-1", "sync-2"]),
         ("proxy", ["proxy"])]),
    "external postgres and redis: main first": (
        {"postgres": {"mode": "external", "host": "db", "password_file":
                      "secrets/postgres_password"},
         "redis": {"mode": "external", "host": "cache"}, "workers": {"pusher": 1},
         "proxy": {"mode": "none"}},
        [("main", ["main"]), ("workers", ["pusher-1"])]),
}


@pytest.mark.parametrize("case", sorted(PLANS))
def test_start_tiers(case, stack_dir):
    changes, expected = PLANS[case]
    stack = stack_with(stack_dir, **changes)
    assert tiers(lifecycle.start_tiers(stack)) == expected


@pytest.mark.parametrize("case", sorted(PLANS))
def test_stop_is_start_inverted(case, stack_dir):
    changes, expected = PLANS[case]
    stack = stack_with(stack_dir, **changes)
    assert tiers(lifecycle.stop_tiers(stack)) == list(reversed(expected))


def test_proxy_restarts_after_main_only(stack_dir):
    stack = stack_with(stack_dir, workers={"sync": 1})
    assert lifecycle.restart_dependencies(stack)["proxy"] == ("main",)
    assert set(lifecycle.dependencies(stack)["proxy"]) == {"main", "sync-1"}


RESTORE = {
    "one worker down: just it": ({"sync-1"}, [("sync-1",)]),
    "main down with workers up: main only": ({"main"}, [("main",)]),
    "postgres and a worker down: postgres first, then the worker": (
        {"postgres", "sync-1"}, [("postgres",), ("sync-1",)]),
    "everything but redis down": (
        {"postgres", "main", "sync-1", "event-persister-1"},
        [("postgres",), ("main",), ("sync-1", "event-persister-1")]),
}


@pytest.mark.parametrize("case", sorted(RESTORE))
def test_restore_order(case, stack_dir):
    down, expected = RESTORE[case]
    stack = stack_with(stack_dir, workers={"sync": 1, "event_persister": 1})
    assert lifecycle.restore_order(stack, down) == expected


def test_cycle_is_named():
    with pytest.raises(lifecycle.CycleError, match="a, b"):
        lifecycle.levels({"a": ("b",), "b": ("a",), "c": ()})


def obs(instance, h, running=True, cid=None):
    return Observed(instance, cid or f"{instance}-{h}-id", h, running)


CONVERGE = {
    "nothing exists: create all": (
        {"main": "h1", "sync-1": "h2"}, [],
        [("create", "main"), ("create", "sync-1")]),
    "all match: adopt without restart": (
        {"main": "h1", "sync-1": "h2"}, [obs("main", "h1"), obs("sync-1", "h2", running=False)],
        [("adopt", "main"), ("adopt", "sync-1")]),
    "config changed: recreate just that one": (
        {"main": "h1", "sync-1": "h2"}, [obs("main", "h1"), obs("sync-1", "old")],
        [("adopt", "main"), ("recreate", "sync-1")]),
    "worker removed from the stack file: remove it": (
        {"main": "h1"}, [obs("main", "h1"), obs("sync-2", "h9")],
        [("adopt", "main"), ("remove", "sync-2")]),
    "duplicate after a crash mid-start: keep the matching one": (
        {"main": "h1"}, [obs("main", "old", cid="a"), obs("main", "h1", cid="b")],
        [("remove", "main"), ("adopt", "main")]),
}


@pytest.mark.parametrize("case", sorted(CONVERGE))
def test_converge(case):
    desired, observed, expected = CONVERGE[case]
    result = lifecycle.converge(desired, observed)
    assert [(a.kind, a.instance) for a in result.actions] == expected
    assert all(a.reason for a in result.actions)
