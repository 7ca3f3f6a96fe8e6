"""Checks across all processes of a stack, run before anything starts.

`lint` looks at the stack, the operator's homeserver.yaml and the rendered configs together and
returns the first problem as a ConfigError (what Synapse would refuse at startup, or silently get
wrong), plus warnings. Pure: no I/O, no Docker.
"""

from __future__ import annotations

from . import catalogue
from .errors import ConfigError
from .inputs import Inputs
from .mounts import outside_mounts
from .stack import Stack
from .synapse_config import Rendered

HEADROOM_CONNECTIONS = 10  # for psql sessions, backups and the port_db tool


def _check_homeserver(stack: Stack, inputs: Inputs) -> None:
    hs, path = inputs.homeserver, stack.homeserver_file
    if "server_name" not in hs:
        raise ConfigError(path, "server_name", "is missing",
                          f"add server_name: {stack.server_name}")
    if hs["server_name"] != stack.server_name:
        raise ConfigError(path, "server_name", f"{hs['server_name']!r} differs from the stack "
                          f"file's {stack.server_name!r}", "make both the same server name")
    if "report_stats" not in hs:
        raise ConfigError(path, "report_stats", "is missing (Synapse refuses to start)",
                          "add report_stats: false (or true)")
    if stack.postgres.mode == "homeserver" and stack.workers:
        engine = (hs.get("database") or {}).get("name", "sqlite3")
        if engine != "psycopg2":
            raise ConfigError(path, "database.name", f"{engine} cannot be shared by workers",
                              "use PostgreSQL: set postgres.mode: managed in the stack file, or "
                              "point database at a PostgreSQL server")


LEGACY_DUTIES = (
    # (legacy key, worker type that replaces it, what True means)
    ("send_federation", "federation_sender", "main sends federation"),
    ("start_pushers", "pusher", "main sends push notifications"),
    ("notify_appservices", "appservice", "main talks to application services"),
    ("update_user_directory", "user_dir", "main updates the user directory"),
)


def _check_legacy_duties(stack: Stack, inputs: Inputs) -> None:
    for key, wtype, meaning in LEGACY_DUTIES:
        if key not in inputs.homeserver:
            continue
        value = inputs.homeserver[key]
        has_worker = bool(stack.of_type(wtype))
        if value is True and has_worker:
            raise ConfigError(stack.homeserver_file, key, f"true ({meaning}) contradicts "
                              f"workers.{wtype}", f"remove {key}; the stack assigns the duty")
        if value is False and not has_worker:
            raise ConfigError(stack.homeserver_file, key, f"false, but the stack has no {wtype} "
                              "worker, so nobody would do it",
                              f"remove {key}, or add workers.{wtype}: 1")


def _check_writers(stack: Stack, rendered: Rendered) -> None:
    shared = rendered.files["shared.yaml"]
    imap = shared.get("instance_map", {})
    for stream, writers in shared.get("stream_writers", {}).items():
        if stream in catalogue.SINGLE_WRITER_STREAMS and len(writers) != 1:
            raise ConfigError(stack.stack_file, "workers", f"stream {stream} has {len(writers)} "
                              "writers; Synapse allows exactly one", "declare one instance")
        for writer in writers:
            listeners = rendered.files[f"{writer}.yaml"].get("worker_listeners", [])
            has_replication = any("replication" in r.get("names", [])
                                  for lst in listeners for r in lst.get("resources", []))
            if writer not in imap or not has_replication:
                raise ConfigError(stack.stack_file, f"workers ({writer})",
                                  f"writer of {stream} lacks an instance_map entry or a "
                                  "replication listener", "report this as a bug")


def published(stack: Stack) -> list[tuple[str, str]]:
    pub = [("publish.client", stack.publish.client),
           ("publish.federation", stack.publish.federation),
           ("daemon.metrics_address", stack.daemon.metrics_address)]
    pub += [(f"publish.synapse_metrics.{k}", v) for k, v in stack.publish.synapse_metrics.items()]
    return [(k, v) for k, v in pub if v]


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _check_ports(stack: Stack) -> None:
    seen: dict[int, str] = {}
    for key, address in published(stack):
        port = host_port(address)[1]
        if not 1 <= port <= 65535:
            raise ConfigError(stack.stack_file, key, f"port {port} is out of range",
                              "use a port from 1 to 65535")
        if port in seen:
            raise ConfigError(stack.stack_file, key, f"port {port} is also used by {seen[port]}",
                              "give each published address its own port")
        seen[port] = key


def connections_needed(stack: Stack, inputs: Inputs) -> int:
    if stack.postgres.mode == "homeserver":
        cp_max = ((inputs.homeserver.get("database") or {}).get("args") or {}).get("cp_max", 10)
    else:
        cp_max = stack.postgres.cp_max
    return cp_max * len(stack.instances) + HEADROOM_CONNECTIONS


def _check_connections(stack: Stack, inputs: Inputs) -> None:
    limit = stack.postgres.max_connections
    if stack.postgres.mode == "homeserver" or limit is None:
        return
    need = connections_needed(stack, inputs)
    if need > limit:
        raise ConfigError(stack.stack_file, "postgres.max_connections",
                          f"{limit} is below the {need} that {len(stack.instances)} processes "
                          f"with cp_max {stack.postgres.cp_max} need (+{HEADROOM_CONNECTIONS})",
                          f"raise it to at least {need}, or lower postgres.cp_max")


def lint(stack: Stack, inputs: Inputs, rendered: Rendered) -> list[str]:
    """Raise the first problem as ConfigError; return warnings."""
    _check_homeserver(stack, inputs)
    _check_legacy_duties(stack, inputs)
    _check_writers(stack, rendered)
    _check_ports(stack)
    _check_connections(stack, inputs)
    warnings = []
    if not stack.workers:
        warnings.append(f"{stack.stack_file}: workers: none declared; main does everything")
    if stack.publish.synapse_metrics:
        warnings.append(f"{stack.stack_file}: publish.synapse_metrics: Synapse metrics are "
                        "published on the host; keep them on 127.0.0.1")
    for key, value in outside_mounts(stack, rendered.files["shared.yaml"]):
        warnings.append(f"{stack.homeserver_file}: {key}: {value} is in none of the stack's "
                        "mounts, so Synapse looks for it inside its image (fix: add a mounts: "
                        "entry that shows it, unless your own image has it)")
    return warnings
