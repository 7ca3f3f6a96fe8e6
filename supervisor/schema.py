"""The stack file's JSON Schema, and the small validator that enforces it.

One source serves two jobs: `synapsectl schema` prints `SCHEMA` for editors, and `validate`
walks a parsed stack file against it, returning the first problem as (key path, problem, fix)
with a did-you-mean for misspelt keys. Only the JSON Schema keywords used here are implemented.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from .catalogue import LEGACY_NAMES, WORKER_TYPES

DNS_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
ADDRESS = r"^(([0-9.]+|\[[0-9a-fA-F:]+\]|localhost):)?[0-9]{1,5}$"
MEMORY = r"^[0-9]+(\.[0-9]+)?[bkmgBKMG]?$"
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]

RESOURCES = {
    "type": "object",
    "description": "Limits for the container.",
    "additionalProperties": False,
    "properties": {
        "memory": {"type": "string", "pattern": MEMORY, "description": "Memory limit, e.g. 512m."},
        "cpus": {"type": "number", "minimum": 0.01, "description": "CPU quota in cores."},
        "pids": {"type": "integer", "minimum": 16, "description": "Maximum number of processes."},
    },
}
ENV = {
    "type": "object",
    "description": "Extra environment variables for the container.",
    "additionalProperties": {"type": "string"},
}
PROCESS = {
    "env": ENV,
    "resources": RESOURCES,
    "log_level": {"type": "string", "enum": LOG_LEVELS},
}
WORKER = {
    "type": ["integer", "object"],
    "minimum": 0,
    "description": "How many instances, or a mapping with count and per-worker overrides.",
    "additionalProperties": False,
    "properties": {
        "count": {"type": "integer", "minimum": 0},
        "names": {
            "type": "array",
            "items": {"type": "string", "pattern": DNS_NAME},
            "description": "Instance names instead of the generated <type>-<n>.",
        },
        **PROCESS,
        "instances": {
            "type": "object",
            "description": "Overrides for one instance, by instance name.",
            "additionalProperties": {
                "type": "object", "additionalProperties": False, "properties": PROCESS,
            },
        },
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "synapse-supervisor stack file",
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "server_name", "homeserver", "signing_key"],
    "properties": {
        "name": {"type": "string", "pattern": DNS_NAME,
                 "description": "Stack name; prefixes containers, network and volumes."},
        "server_name": {"type": "string", "minLength": 1,
                        "description": "The Matrix server name; must match homeserver.yaml."},
        "homeserver": {"type": "string", "minLength": 1,
                       "description": "The operator's homeserver.yaml, relative to this file."},
        "signing_key": {"type": "string", "minLength": 1,
                        "description": "The server's signing key file, relative to this file."},
        "secrets_dir": {"type": "string", "default": "secrets",
                        "description": "Directory of generated secrets (mode 0700, files 0600)."},
        "state_dir": {"type": "string", "default": ".state",
                      "description": "Where the daemon renders configs and notify sockets."},
        "log_level": {"type": "string", "enum": LOG_LEVELS, "default": "INFO"},
        "images": {
            "type": "object", "additionalProperties": False,
            "properties": {k: {"type": "string", "minLength": 1}
                           for k in ("synapse", "postgres", "redis", "proxy")},
        },
        "postgres": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "mode": {"type": "string", "enum": ["managed", "external", "homeserver"],
                         "description": "managed: run it in the stack; external: the "
                         "operator's server below; homeserver: use homeserver.yaml's database."},
                "host": {"type": "string"}, "port": {"type": "integer", "minimum": 1,
                                                     "maximum": 65535},
                "user": {"type": "string"}, "database": {"type": "string"},
                "password_file": {"type": "string"},
                "max_connections": {"type": "integer", "minimum": 1},
                "cp_min": {"type": "integer", "minimum": 1},
                "cp_max": {"type": "integer", "minimum": 1},
                "resources": RESOURCES,
            },
        },
        "redis": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "mode": {"type": "string", "enum": ["managed", "external"]},
                "host": {"type": "string"},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "password_file": {"type": "string"},
                "resources": RESOURCES,
            },
        },
        "proxy": {
            "type": "object", "additionalProperties": False,
            "description": "The reverse proxy that routes requests to workers.",
            "properties": {
                "mode": {"type": "string", "enum": ["managed", "none"],
                         "description": "managed: nginx in the stack is the only container "
                         "publishing client/federation ports; none: main publishes them."},
                "client_max_body_size": {"type": "string", "pattern": r"^[0-9]+[kKmMgG]?$",
                                         "description": "nginx size, e.g. 50M"},
                "resources": RESOURCES,
            },
        },
        "publish": {
            "type": "object", "additionalProperties": False,
            "description": "Host addresses to publish on; null publishes nothing.",
            "properties": {
                "client": {"type": ["string", "null"], "pattern": ADDRESS},
                "federation": {"type": ["string", "null"], "pattern": ADDRESS},
                "synapse_metrics": {"type": "object",
                                    "additionalProperties": {"type": "string",
                                                             "pattern": ADDRESS}},
            },
        },
        "restart": {
            "type": "object", "additionalProperties": False,
            "properties": {
                **{k: {"type": "number", "minimum": 0} for k in (
                    "initial_delay", "max_delay", "stable_after", "stop_timeout",
                    "ready_timeout", "main_ready_timeout")},
                "multiplier": {"type": "number", "minimum": 1},
                "jitter": {"type": "number", "minimum": 0, "maximum": 1},
                "max_attempts": {"type": "integer", "minimum": 1},
            },
        },
        "daemon": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "control_socket": {"type": "string"},
                "control_group": {"type": ["string", "null"]},
                "metrics_address": {"type": ["string", "null"], "pattern": ADDRESS},
            },
        },
        "mounts": {
            "type": "array",
            "description": "Host files or directories mounted read-only into every Synapse "
                           "process, for the files homeserver.yaml names.",
            "items": {
                "type": "object", "additionalProperties": False,
                "required": ["source", "target"],
                "properties": {
                    "source": {"type": "string", "minLength": 1,
                               "description": "Host path, relative to the stack file."},
                    "target": {"type": "string", "pattern": r"^/",
                               "description": "Absolute path inside the containers."},
                },
            },
        },
        "main": {"type": "object", "additionalProperties": False, "properties": PROCESS},
        "workers": {
            "type": "object", "additionalProperties": False,
            "properties": {
                **{name: {**WORKER, "description": t.summary} for name, t in
                   WORKER_TYPES.items()},
                **{legacy: {**WORKER, "description": f"legacy name for {new}"}
                   for legacy, new in LEGACY_NAMES.items()},
            },
        },
    },
}

_TYPES = {
    "string": str, "integer": int, "number": (int, float), "boolean": bool,
    "object": dict, "array": list, "null": type(None),
}


def _is(value: Any, type_name: str) -> bool:
    if type_name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[type_name])


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def validate(value: Any, schema: dict = SCHEMA, path: str = "") -> tuple[str, str, str] | None:
    """The first problem as (key path, problem, fix), or None when `value` fits `schema`."""
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        if not any(_is(value, t) for t in names):
            want = " or ".join("a mapping" if t == "object" else "a list" if t == "array"
                               else t for t in names)
            return path, f"must be {want}, not {type(value).__name__} {value!r}", \
                f"write {want} here"
    if "enum" in schema and value not in schema["enum"]:
        return path, f"{value!r} is not allowed", f"use one of {', '.join(map(str, schema['enum']))}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return path, "must not be empty", "give a value"
        if "pattern" in schema and not re.match(schema["pattern"], value):
            return path, f"{value!r} does not match {schema['pattern']}", \
                "see docs/stack-file.md for the format"
    if _is(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            return path, f"{value} is below the minimum {schema['minimum']}", \
                f"use at least {schema['minimum']}"
        if "maximum" in schema and value > schema["maximum"]:
            return path, f"{value} is above the maximum {schema['maximum']}", \
                f"use at most {schema['maximum']}"
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found = validate(item, schema["items"], f"{path}[{i}]")
            if found:
                return found
    if isinstance(value, dict):
        return _validate_mapping(value, schema, path)
    return None


def _validate_mapping(value: dict, schema: dict, path: str) -> tuple[str, str, str] | None:
    props = schema.get("properties", {})
    for key in schema.get("required", []):
        if key not in value:
            return _join(path, key), "is required", f"add {key}: to the file"
    for key, item in value.items():
        if not isinstance(key, str):
            return _join(path, key), "keys must be strings", "quote the key"
        if key in props:
            sub = props[key]
        else:
            extra = schema.get("additionalProperties", True)
            if extra is False:
                hint = difflib.get_close_matches(key, list(props), n=1, cutoff=0.6)
                fix = f"did you mean {hint[0]!r}?" if hint else \
                    f"remove it; known keys: {', '.join(sorted(props))}"
                return _join(path, key), "unknown key", fix
            sub = extra if isinstance(extra, dict) else {}
        found = validate(item, sub, _join(path, key))
        if found:
            return found
    return None
