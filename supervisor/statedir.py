"""Write the stack's state directory: rendered configs and secret copies the containers mount.

Layout under `state_dir` (mode 0711: traversable, not listable):
  conf/                  mounted read-only at /conf in every Synapse container (owner 991)
    shared.yaml, <instance>.yaml, log/<instance>.yaml   (0600)
    secrets/signing.key, secrets/replication_secret     (0600)
  postgres/postgres_password   mounted at /run/secrets in PostgreSQL (owner 999, 0600)
  notify/<instance>/notify.sock   Synapse's sd_notify target (owner 991, 0600)
  proxy/nginx.conf   the proxy's routing, mounted at /etc/nginx/synapse (root:101, 0640)
  prometheus-targets.json   file_sd targets of every Synapse process (0644)
Files are written atomically and only when their content changed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from .containers import POSTGRES_UID, SYNAPSE_UID, layout_of
from .proxy_config import PROXY_UID
from .prepare import Prepared


def _owner(uid: int) -> int | None:
    return uid if os.geteuid() == 0 else None


def write_private(path: Path, content: str, uid: int | None, mode: int = 0o600) -> bool:
    """Write `content` with `mode` (0600 unless said) and owner `uid` when root; True if it
    changed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.read_text() == content:
            if uid is not None:
                os.chown(path, uid, uid)
            os.chmod(path, mode)
            return False
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.chmod(tmp, mode)
        if uid is not None:
            os.chown(tmp, uid, uid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def write_shared(path: Path, content: str, gid: int) -> None:
    """Write a non-secret file readable by one container group (mode 0640, root:gid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o750)
    if os.geteuid() == 0:
        os.chown(path.parent, 0, gid)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.chmod(tmp, 0o640)
        if os.geteuid() == 0:
            os.chown(tmp, 0, gid)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _private_dir(path: Path, uid: int | None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    if uid is not None:
        os.chown(path, uid, uid)


def materialize(prepared: Prepared) -> list[str]:
    """Write every file the containers need; return the relative paths that changed."""
    stack = prepared.stack
    layout = layout_of(stack)
    synapse_uid, pg_uid = _owner(SYNAPSE_UID), _owner(POSTGRES_UID)
    _private_dir(stack.state_dir, None)
    os.chmod(stack.state_dir, 0o711)  # traversable for prometheus-targets.json, not listable
    _private_dir(layout.conf_dir, synapse_uid)
    _private_dir(layout.conf_dir / "log", synapse_uid)
    _private_dir(layout.conf_dir / "secrets", synapse_uid)
    changed = []
    for rel, content in prepared.rendered.files.items():
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        if write_private(layout.conf_dir / rel, text, synapse_uid):
            changed.append(f"conf/{rel}")
    if stack.postgres.mode == "managed":
        _private_dir(layout.postgres_secret_dir, pg_uid)
        if write_private(layout.postgres_secret_dir / "postgres_password",
                         (prepared.inputs.postgres_password or "") + "\n", pg_uid):
            changed.append("postgres/postgres_password")
    if stack.has_proxy:  # the routing config is rendered when the proxy starts
        layout.proxy_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(layout.proxy_dir, 0o750)
        if os.geteuid() == 0:
            os.chown(layout.proxy_dir, 0, PROXY_UID)
    _private_dir(stack.state_dir / "notify", None)
    os.chmod(stack.state_dir / "notify", 0o700)
    return changed
