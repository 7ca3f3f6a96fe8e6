"""Read a stack file into the `Stack` model, or fail with one line naming the file, key and fix.

Only the stack file itself is read here; the files it points to (homeserver.yaml, signing key,
secrets) are read by `inputs`. Nothing is written and nothing touches Docker.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from pathlib import Path
from typing import Any

import yaml

from . import catalogue, schema
from .errors import ConfigError
from .mounts import within
from .stack import (MAIN, POSTGRES, PROXY, REDIS, SYNAPSE_OWN_PATHS, DaemonSettings, FileMount,
                    Images, Instance, Postgres, Proxy, Publish, Redis, Resources, RestartPolicy,
                    Stack)

DEFAULT_STACK_FILE = "stack.yaml"
RESERVED = (MAIN, POSTGRES, REDIS, PROXY)
# Container paths a mount may not cover or replace: ours (config, media, notify socket, /tmp)
# and the image's system directories.
MOUNT_FORBIDDEN_UNDER = SYNAPSE_OWN_PATHS + (
    "/proc", "/sys", "/dev", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/opt/synapse", "/etc/ssl",
    "/etc/ca-certificates", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/etc/passwd",
    "/etc/group", "/etc/nsswitch.conf")
MOUNT_FORBIDDEN_EXACT = ("/", "/etc", "/run", "/var", "/opt", "/home", "/root")


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file; unreadable or malformed files become a ConfigError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(path, "", f"{what} not found",
                          "check the path, or run `synapsectl init DIR` for a new stack") from None
    except OSError as err:
        raise ConfigError(path, "", f"cannot read {what}: {err.strerror}",
                          "check the file's permissions") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(path, where, f"malformed YAML: {problem}",
                          "fix the YAML syntax there") from None


def load(path: str | Path) -> Stack:
    path = Path(path).absolute()
    data = read_yaml(path, "stack file")
    if not isinstance(data, dict):
        raise ConfigError(path, "", "must be a YAML mapping of keys",
                          "start from `synapsectl init` or docs/stack-file.md")
    _check_worker_types(path, data.get("workers"))
    problem = schema.validate(data)
    if problem:
        raise ConfigError(path, *problem)
    return _build(path, data)


def _check_worker_types(path: Path, workers: Any) -> None:
    if not isinstance(workers, dict):
        return
    for name in workers:
        if catalogue.resolve(str(name)) is None:
            hint = difflib.get_close_matches(str(name), catalogue.known_names(), n=1)
            fix = f"did you mean {hint[0]!r}?" if hint else \
                f"use one of {', '.join(catalogue.known_names())}"
            raise ConfigError(path, f"workers.{name}", "unknown worker type", fix)


def _resources(d: dict | None) -> Resources:
    d = d or {}
    return Resources(memory=d.get("memory"), cpus=d.get("cpus"), pids=d.get("pids"))


def _process_overrides(base: dict, over: dict) -> dict:
    env = {**base.get("env", {}), **over.get("env", {})}
    res = {**base.get("resources", {}), **over.get("resources", {})}
    return {"env": env, "resources": res,
            "log_level": over.get("log_level", base.get("log_level"))}


def _workers(path: Path, workers: dict, log_level: str) -> tuple[Instance, ...]:
    instances: list[Instance] = []
    seen: dict[str, str] = {name: "the stack itself (reserved)" for name in RESERVED}
    for key, spec in workers.items():
        wtype = catalogue.resolve(key)
        assert wtype is not None
        spec = {"count": spec} if isinstance(spec, int) else dict(spec)
        names = spec.get("names")
        count = spec.get("count", len(names) if names else 1)
        where = f"workers.{key}"
        if names is not None and len(names) != count:
            raise ConfigError(path, f"{where}.names", f"lists {len(names)} names for count {count}",
                              "give exactly one name per instance, or drop count")
        if wtype.singleton and count > 1:
            raise ConfigError(path, f"{where}", f"{wtype.name} may run only once, not {count} times",
                              f"set {key}: 1")
        names = names or [f"{wtype.instance_prefix}-{n}" for n in range(1, count + 1)]
        overrides = spec.get("instances", {})
        for extra in sorted(set(overrides) - set(names)):
            raise ConfigError(path, f"{where}.instances.{extra}", "names no instance of this type",
                              f"use one of {', '.join(names)}")
        for name in names:
            if name in seen:
                raise ConfigError(path, f"{where}", f"instance name {name!r} is already used by "
                                  f"{seen[name]}", "give each instance a unique name")
            seen[name] = where
            merged = _process_overrides(spec, overrides.get(name, {}))
            instances.append(Instance(name=name, type=wtype.name, env=merged["env"],
                                      resources=_resources(merged["resources"]),
                                      log_level=merged["log_level"] or log_level))
    return tuple(instances)


def _mounts(path: Path, items: list[dict], base: Path) -> tuple[FileMount, ...]:
    mounts: list[FileMount] = []
    for n, item in enumerate(items):
        # normpath keeps a leading "//"; Docker would not: collapse repeated slashes first
        target = posixpath.normpath(re.sub("/+", "/", item["target"]))
        where = f"mounts[{n}].target"
        if target in MOUNT_FORBIDDEN_EXACT or within(target, MOUNT_FORBIDDEN_UNDER) or any(
                within(p, (target,)) for p in MOUNT_FORBIDDEN_UNDER):
            raise ConfigError(path, where, f"{target} would hide or replace a path the "
                              "containers need", "mount under a directory of your own, e.g. "
                              "/etc/synapse-extra or /data")
        for other in mounts:
            if other.target == target:
                raise ConfigError(path, where, f"{target} is already the target of another "
                                  "mount", "give each mount its own target")
            inner, outer = sorted((target, other.target), key=len, reverse=True)
            if within(inner, (outer,)):
                raise ConfigError(path, where, f"{inner} is inside the target {outer} of another "
                                  "mount (a read-only mount cannot hold another)",
                                  "mount the outer directory only, with the files inside it")
        mounts.append(FileMount(source=(base / item["source"]).absolute(), target=target))
    return tuple(mounts)


def _build(path: Path, data: dict) -> Stack:
    base = path.parent

    def rel(value: str | None) -> Path | None:
        return None if value is None else (base / value).absolute()

    log_level = data.get("log_level", "INFO")
    pg = data.get("postgres", {})
    if pg.get("mode") == "external":
        for key in ("host", "password_file"):
            if key not in pg:
                raise ConfigError(path, f"postgres.{key}", "is required when mode is external",
                                  f"add postgres.{key}, or use mode: managed")
    postgres = Postgres(**{k: v for k, v in pg.items() if k not in ("password_file", "resources")},
                        password_file=rel(pg.get("password_file")),
                        resources=_resources(pg.get("resources")))
    if postgres.cp_min > postgres.cp_max:
        raise ConfigError(path, "postgres.cp_min", f"{postgres.cp_min} is above cp_max "
                          f"{postgres.cp_max}", "make cp_min at most cp_max")
    rd = data.get("redis", {})
    if rd.get("mode") == "external" and "host" not in rd:
        raise ConfigError(path, "redis.host", "is required when mode is external",
                          "add redis.host, or use mode: managed")
    if rd.get("password_file") and rd.get("mode", "managed") == "managed":
        raise ConfigError(path, "redis.password_file", "is only for an external Redis; the "
                          "managed one is reachable only on the stack's network",
                          "remove it, or set redis.mode: external")
    redis = Redis(**{k: v for k, v in rd.items() if k not in ("password_file", "resources")},
                  password_file=rel(rd.get("password_file")),
                  resources=_resources(rd.get("resources")))
    px = data.get("proxy", {})
    proxy = Proxy(**{k: v for k, v in px.items() if k != "resources"},
                  resources=_resources(px.get("resources")))
    main_spec = data.get("main", {})
    main = Instance(name=MAIN, type=MAIN, env=dict(main_spec.get("env", {})),
                    resources=_resources(main_spec.get("resources")),
                    log_level=main_spec.get("log_level", log_level))
    workers = _workers(path, data.get("workers", {}), log_level)
    pub = data.get("publish", {})
    publish = Publish(**pub)
    names = {MAIN, *(w.name for w in workers)}
    for inst in publish.synapse_metrics:
        if inst not in names:
            raise ConfigError(path, f"publish.synapse_metrics.{inst}", "names no instance",
                              f"use one of {', '.join(sorted(names))}")
    daemon = data.get("daemon", {})
    name = data["name"]
    control = daemon.get("control_socket", f"/run/synapse-stack/{name}/control.sock")
    if len(str((base / control).absolute()).encode()) > 107:
        raise ConfigError(path, "daemon.control_socket", "path is longer than the 107 bytes a "
                          "unix socket allows", "choose a shorter path, e.g. under /run")
    return Stack(
        name=name,
        server_name=data["server_name"],
        stack_file=path,
        homeserver_file=rel(data["homeserver"]),
        signing_key_file=rel(data["signing_key"]),
        secrets_dir=rel(data.get("secrets_dir", "secrets")),
        state_dir=rel(data.get("state_dir", ".state")),
        images=Images(**data.get("images", {})),
        postgres=postgres,
        redis=redis,
        proxy=proxy,
        publish=publish,
        restart=RestartPolicy(**data.get("restart", {})),
        daemon=DaemonSettings(
            control_socket=(base / control).absolute(),
            control_group=daemon.get("control_group"),
            metrics_address=daemon.get("metrics_address", "127.0.0.1:9400"),
        ),
        main=main,
        workers=workers,
        mounts=_mounts(path, data.get("mounts", []), base),
    )
