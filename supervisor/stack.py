"""The stack model: plain, frozen data describing one Synapse stack.

Built by `stackfile.load` from the operator's stack.yaml; read by config generation, linting,
planning and the daemon. No I/O and no Docker here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MAIN = "main"
POSTGRES = "postgres"
REDIS = "redis"
PROXY = "proxy"

# Fixed container-side ports (the image contract).
CLIENT_PORT = 8008
FEDERATION_PORT = 8448
METRICS_PORT = 9000
REPLICATION_PORT = 9093
POSTGRES_PORT = 5432
REDIS_PORT = 6379
# The Synapse image's user, and the container paths the stack itself provides to every
# Synapse process (config, media, the sd_notify socket's directory, a tmpfs).
SYNAPSE_UID = 991
NOTIFY_DIR = "/run/synapse-notify"
SYNAPSE_OWN_PATHS = ("/conf", "/synapse_media", NOTIFY_DIR, "/tmp")


@dataclass(frozen=True)
class Resources:
    memory: str | None = None  # docker syntax: "512m", "2g"
    cpus: float | None = None
    pids: int | None = None


@dataclass(frozen=True)
class Instance:
    """One Synapse process: main or a worker."""

    name: str  # stable, DNS-safe: "main", "sync-1", "event-persister-2"
    type: str  # "main" or a catalogue worker type
    env: dict[str, str] = field(default_factory=dict)
    resources: Resources = Resources()
    log_level: str = "INFO"

    @property
    def is_main(self) -> bool:
        return self.type == MAIN


@dataclass(frozen=True)
class Postgres:
    mode: str = "managed"  # managed | external | homeserver
    host: str = POSTGRES
    port: int = POSTGRES_PORT
    user: str = "synapse"
    database: str = "synapse"
    password_file: Path | None = None
    max_connections: int | None = 200
    cp_min: int = 5
    cp_max: int = 10
    resources: Resources = Resources()


@dataclass(frozen=True)
class Redis:
    mode: str = "managed"  # managed | external
    host: str = REDIS
    port: int = REDIS_PORT
    password_file: Path | None = None
    resources: Resources = Resources()


@dataclass(frozen=True)
class Proxy:
    mode: str = "managed"  # managed: nginx in the stack publishes client/federation; none: main does
    resources: Resources = Resources()
    client_max_body_size: str = "50M"


@dataclass(frozen=True)
class Publish:
    client: str | None = "127.0.0.1:8008"
    federation: str | None = "127.0.0.1:8448"
    synapse_metrics: dict[str, str] = field(default_factory=dict)  # instance -> address


@dataclass(frozen=True)
class RestartPolicy:
    initial_delay: float = 1.0
    max_delay: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.2
    stable_after: float = 60.0
    max_attempts: int = 5  # consecutive deaths before ready, then "failed"
    stop_timeout: float = 10.0
    ready_timeout: float = 120.0
    main_ready_timeout: float = 900.0  # first start and upgrades migrate the schema


@dataclass(frozen=True)
class DaemonSettings:
    control_socket: Path = Path("/run/synapse-stack/control.sock")
    control_group: str | None = None
    metrics_address: str | None = "127.0.0.1:9400"


@dataclass(frozen=True)
class Images:
    synapse: str = "synapse-supervisor/synapse:1.163.2"
    postgres: str = "synapse-supervisor/postgres:15"
    redis: str = "synapse-supervisor/redis:7"
    proxy: str = "synapse-supervisor/nginx:1"


@dataclass(frozen=True)
class FileMount:
    """A host file or directory shown read-only to every Synapse process (for the files
    homeserver.yaml names: application service registrations, secrets kept in files...)."""

    source: Path  # on the host, absolute
    target: str  # inside the containers, absolute


@dataclass(frozen=True)
class Stack:
    name: str
    server_name: str
    stack_file: Path
    homeserver_file: Path
    signing_key_file: Path
    secrets_dir: Path
    state_dir: Path
    images: Images
    postgres: Postgres
    redis: Redis
    proxy: Proxy
    publish: Publish
    restart: RestartPolicy
    daemon: DaemonSettings
    main: Instance
    workers: tuple[Instance, ...]
    mounts: tuple[FileMount, ...] = ()

    @property
    def instances(self) -> tuple[Instance, ...]:
        return (self.main, *self.workers)

    def of_type(self, worker_type: str) -> tuple[Instance, ...]:
        return tuple(w for w in self.workers if w.type == worker_type)

    def instance(self, name: str) -> Instance | None:
        return next((i for i in self.instances if i.name == name), None)

    @property
    def managed_services(self) -> tuple[str, ...]:
        names = []
        if self.postgres.mode == "managed":
            names.append(POSTGRES)
        if self.redis.mode == "managed":
            names.append(REDIS)
        return tuple(names)

    @property
    def has_proxy(self) -> bool:
        return self.proxy.mode == "managed"

    @property
    def replication_secret_file(self) -> Path:
        return self.secrets_dir / "replication_secret"

    @property
    def postgres_password_file(self) -> Path | None:
        if self.postgres.password_file is not None:
            return self.postgres.password_file
        if self.postgres.mode == "managed":
            return self.secrets_dir / "postgres_password"
        return None
