"""Generate the Synapse configuration of every process in a stack.

From the stack and the operator's homeserver.yaml this renders, as plain data:
  - `shared.yaml`: the operator's settings plus the keys synapse-supervisor owns (database, Redis,
    instance_map, stream_writers, duty lists, replication secret, metrics), identical for all;
  - `<instance>.yaml`: main's listeners, or a worker's worker_app/name/listeners;
  - `log/<instance>.yaml`: a console-only log config at the instance's level;
  - `secrets/…`: the signing key and replication secret, referenced by path.
The daemon writes these under the stack's state directory and mounts it at /conf in each
container. Keys the operator set that we own are replaced, and `Rendered.notes` says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import catalogue
from .inputs import Inputs
from .stack import (CLIENT_PORT, FEDERATION_PORT, METRICS_PORT, REPLICATION_PORT, Instance,
                    Stack)

# Owned keys that are removed from shared.yaml when the stack does not set them there.
REPLACED_KEYS = ("listeners", "log_config", "worker_replication_secret", "enable_media_repo",
                 "media_instance_running_background_jobs", "instance_map", "stream_writers",
                 "federation_sender_instances", "pusher_instances", "run_background_tasks_on",
                 "notify_appservices_from_worker", "update_user_directory_from_worker")
# Keys dropped from homeserver.yaml: worker-only keys, legacy duty flags, and settings that
# modern Synapse rejects or that make no sense under a supervisor.
DROPPED_KEYS = {
    "worker_app": "set per process by synapse-supervisor",
    "worker_name": "set per process by synapse-supervisor",
    "worker_listeners": "set per process by synapse-supervisor",
    "worker_log_config": "set per process by synapse-supervisor",
    "worker_replication_host": "removed in Synapse 1.88; instance_map.main replaces it",
    "worker_replication_port": "TCP replication was removed in Synapse 1.67; Redis replaces it",
    "worker_replication_http_port": "removed in Synapse 1.88; instance_map.main replaces it",
    "worker_replication_http_tls": "removed in Synapse 1.88",
    "worker_main_http_uri": "unused since Synapse 1.73",
    "log_file": "removed in Synapse 1.3; logs go to the console",
    "send_federation": "federation_sender_instances replaces it",
    "start_pushers": "pusher_instances replaces it",
    "notify_appservices": "notify_appservices_from_worker replaces it",
    "update_user_directory": "update_user_directory_from_worker replaces it",
    "daemonize": "processes run in the foreground under Docker",
    "metrics_port": "a metrics listener on 9000 replaces it",
}


@dataclass(frozen=True)
class Paths:
    """Where files are seen from inside the containers."""

    conf: str = "/conf"
    media: str = "/synapse_media"

    def secret(self, name: str) -> str:
        return f"{self.conf}/secrets/{name}"

    def process_file(self, instance: str) -> str:
        return f"{self.conf}/{instance}.yaml"

    def log_file(self, instance: str) -> str:
        return f"{self.conf}/log/{instance}.yaml"

    @property
    def shared_file(self) -> str:
        return f"{self.conf}/shared.yaml"


@dataclass
class Rendered:
    files: dict[str, Any] = field(default_factory=dict)  # relative path -> dict (YAML) or str
    notes: list[str] = field(default_factory=list)

    def config_files(self, instance: str) -> list[str]:
        """The files one process reads, relative to the conf root."""
        return ["shared.yaml", f"{instance}.yaml", f"log/{instance}.yaml"]


def _listener(port: int, resources: tuple[str, ...] | list[str] | None,
              x_forwarded: bool = False) -> dict:
    listener: dict[str, Any] = {"port": port, "type": "http", "bind_addresses": ["0.0.0.0"]}
    if x_forwarded:
        listener["x_forwarded"] = True
    if resources:
        listener["resources"] = [{"names": list(resources)}]
    return listener


def _metrics_listener() -> dict:
    return {"port": METRICS_PORT, "type": "metrics", "bind_addresses": ["0.0.0.0"]}


def _database(stack: Stack, inputs: Inputs) -> dict:
    if stack.postgres.mode == "homeserver":
        return inputs.homeserver.get("database", {})
    pg = stack.postgres
    return {"name": "psycopg2", "txn_limit": 10000, "args": {
        "user": pg.user, "password": inputs.postgres_password, "database": pg.database,
        "host": pg.host, "port": pg.port, "cp_min": pg.cp_min, "cp_max": pg.cp_max}}


def _redis(stack: Stack, inputs: Inputs) -> dict:
    redis: dict[str, Any] = {"enabled": True, "host": stack.redis.host, "port": stack.redis.port}
    if inputs.redis_password:
        redis["password"] = inputs.redis_password
    return redis


def worker_layout(stack: Stack) -> dict[str, Any]:
    """The keys that must be byte-identical in every process: who writes and who does what."""
    layout: dict[str, Any] = {"instance_map": {"main": {"host": "main",
                                                        "port": REPLICATION_PORT}}}
    writers: dict[str, list[str]] = {}
    for worker in stack.workers:
        wtype = catalogue.WORKER_TYPES[worker.type]
        if wtype.replication_listener:
            layout["instance_map"][worker.name] = {"host": worker.name, "port": REPLICATION_PORT}
        if wtype.stream_writer:
            writers.setdefault(wtype.stream_writer, []).append(worker.name)
        if wtype.duty_list:
            layout.setdefault(wtype.duty_list, []).append(worker.name)
        if wtype.duty_single:
            layout[wtype.duty_single] = worker.name
    if writers:
        layout["stream_writers"] = writers
    media = [w.name for w in stack.workers if catalogue.WORKER_TYPES[w.type].media]
    if media:
        layout["enable_media_repo"] = False
        layout["media_instance_running_background_jobs"] = media[0]
    return layout


def shared_config(stack: Stack, inputs: Inputs, paths: Paths) -> tuple[dict, list[str]]:
    hs = inputs.homeserver
    notes = []
    config = {k: v for k, v in hs.items() if k not in DROPPED_KEYS}
    for key in sorted(set(hs) & set(DROPPED_KEYS)):
        notes.append(f"{stack.homeserver_file}: {key}: dropped ({DROPPED_KEYS[key]})")
    owned: dict[str, Any] = {
        "server_name": stack.server_name,
        "signing_key_path": paths.secret("signing.key"),
        "media_store_path": paths.media,
        "database": _database(stack, inputs),
        "redis": _redis(stack, inputs),
        "worker_replication_secret_path": paths.secret("replication_secret"),
        "enable_metrics": True,
        "no_redirect_stdio": True,
        **worker_layout(stack),
    }
    for key in REPLACED_KEYS:
        config.pop(key, None)
    config.update(owned)
    for key in sorted(set(hs) & (set(owned) | set(REPLACED_KEYS))):
        if hs[key] != owned.get(key):
            notes.append(f"{stack.homeserver_file}: {key}: replaced by synapse-supervisor")
    return config, notes


def process_config(stack: Stack, instance: Instance, paths: Paths) -> dict:
    if instance.is_main:
        return {
            "listeners": [
                _listener(CLIENT_PORT, ["client"], x_forwarded=True),
                _listener(FEDERATION_PORT, ["federation"], x_forwarded=True),
                _listener(REPLICATION_PORT, ["replication"]),
                _metrics_listener(),
            ],
            "log_config": paths.log_file(instance.name),
        }
    wtype = catalogue.WORKER_TYPES[instance.type]
    listeners = [_listener(CLIENT_PORT, wtype.resources, x_forwarded=True)]
    if wtype.federation_listener:
        listeners.append(_listener(FEDERATION_PORT, ["federation"], x_forwarded=True))
    if wtype.replication_listener:
        listeners.append(_listener(REPLICATION_PORT, ["replication"]))
    listeners.append(_metrics_listener())
    config: dict[str, Any] = {
        "worker_app": "synapse.app.generic_worker",
        "worker_name": instance.name,
        "worker_listeners": listeners,
        "worker_log_config": paths.log_file(instance.name),
    }
    if wtype.media:
        config["enable_media_repo"] = True
    return config


def log_config(instance: Instance) -> dict:
    fmt = (f"%(asctime)s - {instance.name} - %(name)s - %(lineno)d - %(levelname)s - "
           "%(request)s - %(message)s")
    return {
        "version": 1,
        "formatters": {"precise": {"format": fmt}},
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "precise",
                                 "stream": "ext://sys.stdout"}},
        # DEBUG on synapse.storage.SQL would log secrets such as access tokens.
        "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
        "root": {"level": instance.log_level, "handlers": ["console"]},
        "disable_existing_loggers": False,
    }


def render(stack: Stack, inputs: Inputs, paths: Paths = Paths()) -> Rendered:
    shared, notes = shared_config(stack, inputs, paths)
    out = Rendered(notes=notes)
    out.files["shared.yaml"] = shared
    for instance in stack.instances:
        out.files[f"{instance.name}.yaml"] = process_config(stack, instance, paths)
        out.files[f"log/{instance.name}.yaml"] = log_config(instance)
    out.files["secrets/signing.key"] = inputs.signing_key + "\n"
    out.files["secrets/replication_secret"] = inputs.replication_secret + "\n"
    return out
