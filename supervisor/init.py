"""`synapsectl init`: write a complete, working stack directory for a new operator.

The directory gets a stack.yaml with a sensible default worker set, a homeserver.yaml generated
by Synapse's own `--generate-config` (from the locally installed matrix-synapse, or in the
Synapse image when it is not installed), the signing key, and generated secrets in files of mode
0600 inside a 0700 directory. An existing stack is never overwritten.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .errors import ConfigError, SupervisorError
from .stack import Images

DEFAULT_WORKERS = ("sync", "client_reader", "federation_reader", "federation_sender",
                   "event_persister", "media_repository")

STACK_TEMPLATE = """\
# synapse-supervisor stack file: every key is described in docs/stack-file.md.
name: {name}
server_name: {server_name}
homeserver: homeserver.yaml          # your Synapse settings; keys the stack owns are replaced
signing_key: {server_name}.signing.key
secrets_dir: secrets                 # generated secrets, mode 0600
state_dir: .state                    # rendered per-process configs and notify sockets

images:
  synapse: {synapse_image}
  postgres: {postgres_image}
  redis: {redis_image}
  proxy: {proxy_image}

postgres:
  mode: managed                      # or external (host, port, user, database, password_file)
  max_connections: 200
redis:
  mode: managed
proxy:
  mode: managed                      # nginx routes each request to the right worker (docs/routing.md)

publish:                             # host addresses, on the proxy; replication and metrics stay internal
  client: 127.0.0.1:{client_port}
  federation: 127.0.0.1:{federation_port}

restart:
  initial_delay: 1
  max_delay: 60
  max_attempts: 5
  stop_timeout: 10

daemon:
  control_socket: /run/synapse-stack/{name}/control.sock
  metrics_address: 127.0.0.1:{metrics_port}

workers:
{workers}
"""


def _generate_homeserver(directory: Path, server_name: str, image: str) -> None:
    args = ["-m", "synapse.app.homeserver", "--generate-config", "--server-name", server_name,
            "--report-stats=no"]
    try:
        import synapse  # noqa: F401  (only to learn whether it is installed)
        local = True
    except ImportError:
        local = False
    if local:
        cmd = [sys.executable, *args, "--config-path", str(directory / "homeserver.yaml"),
               "--data-directory", str(directory)]
    elif shutil.which("docker"):
        cmd = ["docker", "run", "--rm", "--network", "none", "--user", f"{os.getuid()}",
               "-v", f"{directory}:/out", "--entrypoint", "/opt/synapse/bin/python", image,
               *args, "--config-path", "/out/homeserver.yaml", "--data-directory", "/out"]
    else:
        raise SupervisorError("init: Synapse is neither installed here nor runnable in Docker "
                              "(fix: pip install matrix-synapse, or build the image with "
                              "image/build)")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise SupervisorError(f"init: Synapse's --generate-config failed: {' '.join(tail)}")


def _isolate(homeserver: Path) -> None:
    """No outbound key-server lookups (for offline machines and tests)."""
    text = homeserver.read_text()
    text, n = re.subn(r"(?m)^trusted_key_servers:\n(  .*\n)+",
                      "trusted_key_servers: []\nsuppress_key_server_warning: true\n", text)
    if n == 0:
        text += "\ntrusted_key_servers: []\nsuppress_key_server_warning: true\n"
    homeserver.write_text(text)


def write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")


def init_stack(directory: Path, server_name: str, name: str | None = None,
               isolated: bool = False, client_port: int = 8008, federation_port: int = 8448,
               metrics_port: int = 9400, workers: tuple[str, ...] = DEFAULT_WORKERS,
               images: Images = Images()) -> Path:
    directory = directory.absolute()
    stack_file = directory / "stack.yaml"
    for existing in (stack_file, directory / "homeserver.yaml"):
        if existing.exists():
            raise ConfigError(existing, "", "already exists; init never overwrites a stack",
                              "choose an empty directory")
    if not re.match(r"^[A-Za-z0-9.-]+(:[0-9]+)?$", server_name):
        raise ConfigError("--server-name", "", f"{server_name!r} is not a valid server name",
                          "use a DNS name such as example.org")
    name = name or re.sub(r"[^a-z0-9-]", "-", server_name.lower()).strip("-")[:40] or "synapse"
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o750)
    _generate_homeserver(directory, server_name, images.synapse)
    homeserver = directory / "homeserver.yaml"
    yaml.safe_load(homeserver.read_text())  # Synapse wrote it; it must parse
    if isolated:
        _isolate(homeserver)
    os.chmod(homeserver, 0o600)
    for leftover in directory.glob("*.log.config"):
        leftover.unlink()  # the stack renders console logging itself
    key = directory / f"{server_name}.signing.key"
    os.chmod(key, 0o600)
    secrets_dir = directory / "secrets"
    secrets_dir.mkdir(mode=0o700)
    write_secret(secrets_dir / "replication_secret", secrets.token_urlsafe(32))
    write_secret(secrets_dir / "postgres_password", secrets.token_urlsafe(24))
    worker_lines = "\n".join(f"  {w}: 1" for w in workers) if workers else "  {}"
    stack_file.write_text(STACK_TEMPLATE.format(
        name=name, server_name=server_name, synapse_image=images.synapse,
        postgres_image=images.postgres, redis_image=images.redis, proxy_image=images.proxy,
        client_port=client_port,
        federation_port=federation_port, metrics_port=metrics_port, workers=worker_lines))
    os.chmod(stack_file, 0o640)
    return stack_file
