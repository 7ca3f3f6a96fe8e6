"""Read the files a stack points to: the operator's homeserver.yaml, the signing key, secrets,
and the host files of its `mounts`.

Each problem is a ConfigError naming the file and the fix. Nothing here writes anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .mounts import check_sources
from .stack import Stack
from .stackfile import read_yaml

SIGNING_KEY = re.compile(r"^ed25519 [A-Za-z0-9_]+ [A-Za-z0-9+/=]+$")


@dataclass(frozen=True)
class Inputs:
    homeserver: dict
    signing_key: str
    replication_secret: str
    postgres_password: str | None
    redis_password: str | None
    mounts_digest: str = ""  # the contents of the stack's `mounts`


def read_secret(path: Path, what: str, fix: str) -> str:
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(path, "", f"{what} not found", fix) from None
    except OSError as err:
        raise ConfigError(path, "", f"cannot read {what}: {err.strerror}",
                          "make it readable by the user running synapse-supervisor") from None
    if not value:
        raise ConfigError(path, "", f"{what} is empty", fix)
    return value


def read_homeserver(stack: Stack) -> dict:
    data = read_yaml(stack.homeserver_file, "homeserver.yaml")
    if not isinstance(data, dict):
        raise ConfigError(stack.homeserver_file, "", "must be a YAML mapping of Synapse settings",
                          "generate one with `synapsectl init` or Synapse's --generate-config")
    return data


def read_inputs(stack: Stack) -> Inputs:
    homeserver = read_homeserver(stack)
    key = read_secret(stack.signing_key_file, "signing key",
                      "copy the server's existing key there, or generate one with "
                      "`python -m synapse.app.homeserver --generate-keys`")
    for n, line in enumerate(key.splitlines(), 1):
        if not SIGNING_KEY.match(line.strip()):
            raise ConfigError(stack.signing_key_file, f"line {n}",
                              "is not a Synapse signing key ('ed25519 <id> <base64>')",
                              "point signing_key at the server's signing key file")
    init_fix = "run `synapsectl init` again in a new directory to see the expected layout, " \
               "or write a random string to it with mode 0600"
    replication = read_secret(stack.replication_secret_file, "replication secret", init_fix)
    pg_file = stack.postgres_password_file
    pg_password = read_secret(pg_file, "PostgreSQL password", init_fix) if pg_file else None
    redis_password = None
    if stack.redis.password_file is not None:
        redis_password = read_secret(stack.redis.password_file, "Redis password", init_fix)
    return Inputs(homeserver=homeserver, signing_key=key, replication_secret=replication,
                  postgres_password=pg_password, redis_password=redis_password,
                  mounts_digest=check_sources(stack))
