"""Bad input: each case is one line on stderr naming the file and key, exit code 2."""

from __future__ import annotations

import os

import pytest

from supervisor.cli import main
from tests.unit.conftest import edit_yaml


def set_key(*path, value):
    def change(data):
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return change


def drop_key(*path):
    def change(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return change


def stack_edit(change):
    return lambda d: edit_yaml(d / "stack.yaml", change)


def hs_edit(change):
    return lambda d: edit_yaml(d / "homeserver.yaml", change)


def write(name, text):
    return lambda d: (d / name).write_text(text)


def remove(name):
    return lambda d: (d / name).unlink()


def unreadable(name):
    """Root reads any mode, so make the path something no one can read as a file."""
    def do(d):
        (d / name).unlink()
        (d / name).mkdir()
    return do


CASES = {
    "malformed YAML in the stack file": (
        write("stack.yaml", "name: x\n  server_name: [oops\n"), "stack.yaml: line", "YAML"),
    "the stack file is a list": (write("stack.yaml", "- a\n- b\n"), "stack.yaml", "mapping"),
    "unknown top-level key, with a did-you-mean": (
        stack_edit(set_key("workerz", value={})), "stack.yaml: workerz", "did you mean 'workers'"),
    "unknown worker type, with a did-you-mean": (
        stack_edit(set_key("workers", "synk", value=1)), "stack.yaml: workers.synk",
        "did you mean 'sync'"),
    "unknown worker type, no close match": (
        stack_edit(set_key("workers", "toaster", value=1)), "workers.toaster",
        "unknown worker type"),
    "second instance of a singleton": (
        stack_edit(set_key("workers", "typing", value=2)), "workers.typing", "only once"),
    "singleton via names": (
        stack_edit(set_key("workers", "user_dir", value={"names": ["ud-a", "ud-b"]})),
        "workers.user_dir", "only once"),
    "missing homeserver.yaml": (remove("homeserver.yaml"), "homeserver.yaml", "not found"),
    "missing signing key": (remove("example.test.signing.key"), "signing.key", "not found"),
    "signing key is garbage": (
        write("example.test.signing.key", "hello\n"), "signing.key: line 1", "signing key"),
    "a key of the wrong type": (
        stack_edit(set_key("workers", "sync", value="two")), "workers.sync", "integer"),
    "negative worker count": (
        stack_edit(set_key("workers", "sync", value=-1)), "workers.sync", "minimum"),
    "duplicate instance name": (
        stack_edit(set_key("workers", "client_reader", value={"names": ["sync-1"]})),
        "workers.client_reader", "already used"),
    "instance named main": (
        stack_edit(set_key("workers", "pusher", value={"names": ["main"]})), "workers.pusher",
        "already used"),
    "instance named like an infrastructure container": (
        stack_edit(set_key("workers", "pusher", value={"names": ["redis"]})), "workers.pusher",
        "reserved"),
    "password for the managed redis": (
        stack_edit(set_key("redis", "password_file", value="secrets/postgres_password")),
        "redis.password_file", "external"),
    "names and count disagree": (
        stack_edit(set_key("workers", "sync", value={"count": 2, "names": ["a-sync"]})),
        "workers.sync.names", "one name per instance"),
    "SQLite with workers": (
        stack_edit(set_key("postgres", "mode", value="homeserver")), "homeserver.yaml: database",
        "PostgreSQL"),
    "unreadable secret": (unreadable("secrets/replication_secret"), "replication_secret",
                          "cannot read"),
    "missing secret": (remove("secrets/postgres_password"), "postgres_password", "not found"),
    "empty secret": (write("secrets/replication_secret", "\n"), "replication_secret", "empty"),
    "server_name mismatch": (hs_edit(set_key("server_name", value="other.test")),
                             "homeserver.yaml: server_name", "differs"),
    "homeserver.yaml without report_stats": (hs_edit(drop_key("report_stats")),
                                             "homeserver.yaml: report_stats", "missing"),
    "homeserver.yaml not a mapping": (write("homeserver.yaml", "just a string\n"),
                                      "homeserver.yaml", "mapping"),
    "legacy send_federation contradicts the senders": (
        hs_edit(set_key("send_federation", value=True)), "homeserver.yaml: send_federation",
        "contradicts"),
    "legacy start_pushers false without pushers": (
        hs_edit(set_key("start_pushers", value=False)), "homeserver.yaml: start_pushers",
        "nobody"),
    "max_connections too small": (
        stack_edit(set_key("postgres", "max_connections", value=20)),
        "postgres.max_connections", "raise it"),
    "published port used twice": (
        stack_edit(set_key("publish", "federation", value="127.0.0.1:8008")),
        "publish.federation", "also used"),
    "publish address malformed": (
        stack_edit(set_key("publish", "client", value="everywhere")), "publish.client",
        "does not match"),
    "external postgres without host": (
        stack_edit(set_key("postgres", "mode", value="external")), "postgres.host", "required"),
    "unknown postgres mode": (
        stack_edit(set_key("postgres", "mode", value="cloud")), "postgres.mode", "one of"),
    "stack name not DNS-safe": (stack_edit(set_key("name", value="My Stack")), "stack.yaml: name",
                                "does not match"),
    "required key missing": (stack_edit(drop_key("server_name")), "stack.yaml: server_name",
                             "required"),
    "override for an unknown instance": (
        stack_edit(set_key("workers", "sync", value={"count": 1, "instances": {"sync-9": {}}})),
        "workers.sync.instances.sync-9", "names no instance"),
    "metrics published for an unknown instance": (
        stack_edit(set_key("publish", "synapse_metrics", value={"nope-1": "127.0.0.1:9101"})),
        "publish.synapse_metrics.nope-1", "names no instance"),
    "resources memory malformed": (
        stack_edit(set_key("main", "resources", value={"memory": "lots"})),
        "main.resources.memory", "does not match"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("verb", ["validate", "plan"])
def test_bad_input_is_one_line_naming_file_and_key(case, verb, stack_dir, capsys):
    mutate, where, what = CASES[case]
    mutate(stack_dir)
    before = {p: p.read_bytes() for p in stack_dir.rglob("*") if p.is_file()
              and os.access(p, os.R_OK)}
    code = main([verb, "--stack", str(stack_dir / "stack.yaml")])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (case, err)
    assert len(lines) == 1, lines
    assert where in lines[0] and what in lines[0], lines[0]
    assert "fix:" in lines[0] or "did you mean" in lines[0], lines[0]
    assert out == ""
    after = {p: p.read_bytes() for p in before}
    assert before == after  # nothing written
    assert not (stack_dir / ".state").exists()


def test_pristine_stack_is_valid(stack_dir, capsys):
    assert main(["validate", "--stack", str(stack_dir / "stack.yaml")]) == 0
    assert "ok: 7 Synapse processes" in capsys.readouterr().out
