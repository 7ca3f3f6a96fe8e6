"""Turn a prepared stack into container specifications: plain data, no Docker calls.

Every container the stack runs (PostgreSQL, Redis, main, each worker) gets a `ContainerSpec` with
its image, command, environment, mounts, published ports, limits, hardening and labels. The
`config_hash` label covers everything that would make a running container stale, including the
content of the config files it reads, so a restarted daemon can adopt what still matches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import catalogue, proxy_config
from .lint import host_port
from .prepare import Prepared
from .stack import (CLIENT_PORT, FEDERATION_PORT, MAIN, METRICS_PORT, NOTIFY_DIR, POSTGRES,
                    PROXY, REDIS, SYNAPSE_UID, Instance, Resources, Stack)

LABEL_PREFIX = "synapse-supervisor"
LABEL_STACK = f"{LABEL_PREFIX}.stack"
LABEL_INSTANCE = f"{LABEL_PREFIX}.instance"
LABEL_ROLE = f"{LABEL_PREFIX}.role"
LABEL_HASH = f"{LABEL_PREFIX}.config-hash"

POSTGRES_UID = 999  # the postgres image's `postgres` user
NOTIFY_SOCKET = f"{NOTIFY_DIR}/notify.sock"


def image_keys(stack: Stack) -> list[tuple[str, str]]:
    """(stack file key, image) for every image this stack runs."""
    images = stack.images
    wanted = [("images.synapse", images.synapse),
              ("images.postgres", images.postgres if stack.postgres.mode == "managed" else None),
              ("images.redis", images.redis if stack.redis.mode == "managed" else None),
              ("images.proxy", images.proxy if stack.has_proxy else None)]
    return [(key, img) for key, img in wanted if img]


@dataclass(frozen=True)
class Mount:
    source: str  # host path (bind) or volume name
    target: str
    kind: str = "bind"  # bind | volume
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    instance: str
    role: str  # postgres, redis, main or a worker type
    name: str
    image: str
    network: str
    env: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] | None = None
    mounts: tuple[Mount, ...] = ()
    ports: dict[str, tuple[str, int]] = field(default_factory=dict)  # "8008/tcp" -> (ip, port)
    user: str | None = None
    resources: Resources = Resources()
    stop_signal: str = "SIGTERM"
    stop_timeout: float = 10.0
    read_only: bool = False
    tmpfs: dict[str, str] = field(default_factory=dict)
    cap_drop: tuple[str, ...] = ()
    cap_add: tuple[str, ...] = ()
    security_opt: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    synapse: bool = False  # speaks sd_notify and serves replication metrics

    @property
    def config_hash(self) -> str:
        return self.labels[LABEL_HASH]


@dataclass(frozen=True)
class StackLayout:
    """Names of the stack-wide Docker objects and host paths."""

    stack: str
    state_dir: Path

    @property
    def network(self) -> str:
        return f"{self.stack}-net"

    @property
    def pg_volume(self) -> str:
        return f"{self.stack}-pgdata"

    @property
    def media_volume(self) -> str:
        return f"{self.stack}-media"

    @property
    def conf_dir(self) -> Path:
        return self.state_dir / "conf"

    @property
    def postgres_secret_dir(self) -> Path:
        return self.state_dir / "postgres"

    @property
    def proxy_dir(self) -> Path:
        return self.state_dir / "proxy"

    def notify_dir(self, instance: str) -> Path:
        return self.state_dir / "notify" / instance

    def container(self, instance: str) -> str:
        return f"{self.stack}-{instance}"


def layout_of(stack: Stack) -> StackLayout:
    return StackLayout(stack.name, stack.state_dir)


def _hash(spec_fields: dict, extra: list[str]) -> str:
    blob = json.dumps(spec_fields, sort_keys=True, default=str) + "\n".join(extra)
    return hashlib.sha256(blob.encode()).hexdigest()


def _finish(spec: ContainerSpec, stack: Stack, extra: list[str]) -> ContainerSpec:
    fields = asdict(spec)
    fields.pop("labels")
    labels = {LABEL_STACK: stack.name, LABEL_INSTANCE: spec.instance, LABEL_ROLE: spec.role,
              LABEL_HASH: _hash(fields, extra)}
    return ContainerSpec(**{**asdict(spec), "labels": labels, "resources": spec.resources,
                            "mounts": spec.mounts})


def _ports(pairs: list[tuple[int, str | None]]) -> dict[str, tuple[str, int]]:
    return {f"{port}/tcp": host_port(addr) for port, addr in pairs if addr}


def synapse_spec(prepared: Prepared, instance: Instance, image_id: str = "") -> ContainerSpec:
    stack, layout = prepared.stack, layout_of(prepared.stack)
    worker_app = "synapse.app.homeserver" if instance.is_main else "synapse.app.generic_worker"
    env = {
        "SYNAPSE_CONFIG_FILES": f"/conf/shared.yaml:/conf/{instance.name}.yaml",
        "SYNAPSE_WORKER": worker_app,
        "SYNAPSE_WORKER_NAME": instance.name,
        "SYNAPSE_HOSTNAME": instance.name,
        "NOTIFY_SOCKET": NOTIFY_SOCKET,
        **instance.env,
    }
    mounts = [Mount(str(layout.conf_dir), "/conf", read_only=True),
              Mount(str(layout.notify_dir(instance.name)), NOTIFY_DIR)]
    mounts += [Mount(str(m.source), m.target, read_only=True) for m in stack.mounts]
    media = instance.is_main or catalogue.WORKER_TYPES[instance.type].media
    if media:
        mounts.append(Mount(layout.media_volume, "/synapse_media", kind="volume"))
    published: list[tuple[int, str | None]] = []
    if instance.is_main and not stack.has_proxy:
        published += [(CLIENT_PORT, stack.publish.client),
                      (FEDERATION_PORT, stack.publish.federation)]
    published.append((METRICS_PORT, stack.publish.synapse_metrics.get(instance.name)))
    spec = ContainerSpec(
        instance=instance.name, role=instance.type, name=layout.container(instance.name),
        image=stack.images.synapse, network=layout.network, env=env, mounts=tuple(mounts),
        ports=_ports(published), user=f"{SYNAPSE_UID}:{SYNAPSE_UID}",
        resources=instance.resources, stop_timeout=stack.restart.stop_timeout,
        read_only=True, tmpfs={"/tmp": "rw,noexec,nosuid,size=64m"}, cap_drop=("ALL",),
        security_opt=("no-new-privileges",), synapse=True)
    rendered = prepared.rendered
    files = ["shared.yaml", f"{instance.name}.yaml", f"log/{instance.name}.yaml",
             "secrets/signing.key", "secrets/replication_secret"]
    digest = [prepared.inputs.mounts_digest] if stack.mounts else []  # no mounts: same hash
    return _finish(spec, stack, [image_id] + digest +  # as before mounts existed
                   [json.dumps(rendered.files[f], sort_keys=True) for f in files])


def postgres_spec(prepared: Prepared, image_id: str = "") -> ContainerSpec:
    stack, layout = prepared.stack, layout_of(prepared.stack)
    pg = stack.postgres
    spec = ContainerSpec(
        instance=POSTGRES, role=POSTGRES, name=layout.container(POSTGRES),
        image=stack.images.postgres, network=layout.network,
        env={"POSTGRES_USER": pg.user, "POSTGRES_DB": pg.database,
             "POSTGRES_PASSWORD_FILE": "/run/secrets/postgres_password",
             "POSTGRES_MAX_CONNECTIONS": str(pg.max_connections or 200)},
        mounts=(Mount(layout.pg_volume, "/var/lib/postgresql/data", kind="volume"),
                Mount(str(layout.postgres_secret_dir), "/run/secrets", read_only=True)),
        resources=pg.resources, stop_signal="SIGINT", stop_timeout=stack.restart.stop_timeout,
        user=f"{POSTGRES_UID}:{POSTGRES_UID}", cap_drop=("ALL",),
        security_opt=("no-new-privileges",))
    return _finish(spec, stack, [image_id, prepared.inputs.postgres_password or ""])


def redis_spec(prepared: Prepared, image_id: str = "") -> ContainerSpec:
    stack, layout = prepared.stack, layout_of(prepared.stack)
    spec = ContainerSpec(
        instance=REDIS, role=REDIS, name=layout.container(REDIS), image=stack.images.redis,
        network=layout.network, resources=stack.redis.resources,
        stop_timeout=stack.restart.stop_timeout, cap_drop=("ALL",),
        security_opt=("no-new-privileges",))
    return _finish(spec, stack, [image_id])


def proxy_spec(prepared: Prepared, image_id: str = "") -> ContainerSpec:
    """nginx in front of main and the workers: the only container publishing client and
    federation ports. Its routing config (rendered by the daemon as instances come and go) is
    not part of the hash: it changes by reload, not by recreation."""
    stack, layout = prepared.stack, layout_of(prepared.stack)
    spec = ContainerSpec(
        instance=PROXY, role=proxy_config.PROXY_ROLE, name=layout.container(PROXY),
        image=stack.images.proxy, network=layout.network, command=proxy_config.COMMAND,
        mounts=(Mount(str(layout.proxy_dir), proxy_config.CONFIG_DIR, read_only=True),),
        ports=_ports([(CLIENT_PORT, stack.publish.client),
                      (FEDERATION_PORT, stack.publish.federation)]),
        user=proxy_config.CONTAINER_USER, resources=stack.proxy.resources,
        stop_signal=proxy_config.STOP_SIGNAL, stop_timeout=stack.restart.stop_timeout,
        read_only=True, tmpfs=dict(proxy_config.TMPFS), cap_drop=("ALL",),
        security_opt=("no-new-privileges",))
    return _finish(spec, stack, [image_id, repr(proxy_config.settings_for(stack))])


def specs(prepared: Prepared, image_ids: dict[str, str] | None = None) -> dict[str, ContainerSpec]:
    """Every container of the stack, keyed by instance, in dependency order."""
    ids = image_ids or {}
    stack = prepared.stack
    out: dict[str, ContainerSpec] = {}
    if stack.postgres.mode == "managed":
        out[POSTGRES] = postgres_spec(prepared, ids.get(stack.images.postgres, ""))
    if stack.redis.mode == "managed":
        out[REDIS] = redis_spec(prepared, ids.get(stack.images.redis, ""))
    for inst in stack.instances:
        out[inst.name] = synapse_spec(prepared, inst, ids.get(stack.images.synapse, ""))
    if stack.has_proxy:
        out[PROXY] = proxy_spec(prepared, ids.get(stack.images.proxy, ""))
    assert MAIN in out
    return out
