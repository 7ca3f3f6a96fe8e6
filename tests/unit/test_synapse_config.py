"""Generated configs: what they contain, and that Synapse's own parser accepts every one."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from supervisor import catalogue
from supervisor.prepare import prepare
from supervisor.synapse_config import Paths
from tests.unit.conftest import edit_yaml

ALL_TYPES = {name: 1 for name in catalogue.WORKER_TYPES}
ALL_TYPES.update(sync=2, event_persister=2, federation_sender=2, media_repository=2)


def write_rendered(prepared, root: Path) -> None:
    for rel, content in prepared.rendered.files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))


@pytest.fixture
def every_type(stack_dir, tmp_path):
    edit_yaml(stack_dir / "stack.yaml",
              lambda d: d.update(workers=ALL_TYPES, postgres={"max_connections": 400}))
    paths = Paths(conf=str(tmp_path / "conf"), media=str(tmp_path / "media"))
    prepared = prepare(stack_dir / "stack.yaml", paths)
    write_rendered(prepared, tmp_path / "conf")
    return prepared, paths


def test_every_process_config_loads_in_synapses_parser(every_type):
    from synapse.config.homeserver import HomeServerConfig
    prepared, paths = every_type
    assert len(prepared.stack.instances) == 1 + len(ALL_TYPES) + 4
    for instance in prepared.stack.instances:
        config = HomeServerConfig.load_config(
            "synapse", ["-c", paths.shared_file, "-c", paths.process_file(instance.name)])
        if instance.is_main:
            assert config.worker.worker_app is None
            assert config.worker.worker_name is None
        else:
            assert config.worker.worker_app == "synapse.app.generic_worker"
            assert config.worker.worker_name == instance.name
        assert config.redis.redis_enabled
        assert config.metrics.enable_metrics
        assert config.server.server_name == "example.test"


def test_writers_and_duties_agree_in_every_process(every_type):
    from synapse.config.homeserver import HomeServerConfig
    prepared, paths = every_type
    seen = set()
    for instance in prepared.stack.instances:
        config = HomeServerConfig.load_config(
            "synapse", ["-c", paths.shared_file, "-c", paths.process_file(instance.name)])
        w = config.worker
        seen.add((tuple(w.writers.events), tuple(w.federation_shard_config.instances),
                  tuple(w.pusher_shard_config.instances), tuple(sorted(set(w.instance_map) - {"main", "master"}))))
        assert w.writers.events == ["event-persister-1", "event-persister-2"]
        assert w.writers.typing == ["typing-1"]
        assert w.writers.quarantined_media_changes == ["media-repository-1",
                                                       "media-repository-2"]
        assert w.federation_shard_config.instances == ["federation-sender-1",
                                                       "federation-sender-2"]
        assert w.pusher_shard_config.instances == ["pusher-1"]
        assert w.run_background_tasks == (instance.name == "background-worker-1")
        assert w.should_update_user_directory == (instance.name == "user-dir-1")
    assert len(seen) == 1  # the shared layout is identical in every process
    # main knows itself as "main" in instance_map; workers rename that entry to "master".


def test_media_repo_only_on_media_workers(every_type):
    from synapse.config.homeserver import HomeServerConfig
    prepared, paths = every_type
    for instance in prepared.stack.instances:
        config = HomeServerConfig.load_config(
            "synapse", ["-c", paths.shared_file, "-c", paths.process_file(instance.name)])
        assert config.media.can_load_media_repo == (instance.type == "media_repository")


def test_operator_keys_kept_and_owned_keys_replaced(stack_dir):
    def change(hs):
        hs["max_upload_size"] = "77M"
        hs["listeners"] = [{"port": 1234, "type": "http"}]
        hs["worker_replication_host"] = "old-main"
    edit_yaml(stack_dir / "homeserver.yaml", change)
    prepared = prepare(stack_dir / "stack.yaml")
    shared = prepared.rendered.files["shared.yaml"]
    assert shared["max_upload_size"] == "77M"
    assert "listeners" not in shared and "worker_replication_host" not in shared
    assert prepared.rendered.files["main.yaml"]["listeners"][0]["port"] == 8008
    notes = "\n".join(prepared.rendered.notes)
    assert "listeners: replaced" in notes
    assert "worker_replication_host: dropped (removed in Synapse 1.88" in notes


def test_no_worker_stack_has_no_instance_map_writers(stack_dir):
    edit_yaml(stack_dir / "stack.yaml", lambda d: d.update(workers={}))
    prepared = prepare(stack_dir / "stack.yaml")
    shared = prepared.rendered.files["shared.yaml"]
    assert "stream_writers" not in shared and "federation_sender_instances" not in shared
    assert prepared.warnings and "none declared" in prepared.warnings[0]


def test_legacy_names_in_the_stack_file(stack_dir):
    edit_yaml(stack_dir / "stack.yaml",
              lambda d: d.update(workers={"synchrotron": 1, "synapse.app.federation_sender": 1,
                                          "frontend_proxy": 1}))
    prepared = prepare(stack_dir / "stack.yaml")
    assert [(w.name, w.type) for w in prepared.stack.workers] == [
        ("sync-1", "sync"), ("federation-sender-1", "federation_sender"),
        ("client-reader-1", "client_reader")]


def test_health_listener_on_processes_without_client_traffic(every_type):
    prepared, _ = every_type
    sender = prepared.rendered.files["federation-sender-1.yaml"]["worker_listeners"]
    assert sender[0]["port"] == 8008 and "resources" not in sender[0]  # serves /health only
    assert sender[-1] == {"port": 9000, "type": "metrics", "bind_addresses": ["0.0.0.0"]}


def test_log_config_is_console_only_at_instance_level(stack_dir):
    edit_yaml(stack_dir / "stack.yaml",
              lambda d: d.update(workers={"sync": {"count": 1, "log_level": "DEBUG"}}))
    prepared = prepare(stack_dir / "stack.yaml")
    log = prepared.rendered.files["log/sync-1.yaml"]
    assert log["root"]["level"] == "DEBUG"
    assert list(log["handlers"]) == ["console"]
    assert log["loggers"]["synapse.storage.SQL"]["level"] == "INFO"
    assert prepared.rendered.files["log/main.yaml"]["root"]["level"] == "INFO"
