"""Host files for Synapse: the stack file's `mounts`, checked and fingerprinted.

Files that homeserver.yaml names (application service registrations, secrets kept in files,
templates) are read by Synapse inside its container. `mounts` shows host paths there,
read-only. Before anything starts: each source exists and uid 991 (the image's `synapse`
user) can read it (`check_sources`, which also makes one digest of the mounted contents, so
that `reload` recreates the Synapse containers when a mounted file changed); every file
setting that points into a mount names a host file that exists (`check_settings`); settings
no mount shows are listed for a warning (`outside_mounts`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import stat
from pathlib import Path
from typing import Any, Iterator

from .errors import ConfigError
from .stack import SYNAPSE_OWN_PATHS, SYNAPSE_UID, FileMount, Stack

MAX_ENTRIES = 2000  # a mount is for config files, not data
FILE_KEY_SUFFIXES = ("_path", "_file", "_files", "_dir", "_directory")
NOT_READ = ("pid_file", "worker_pid_file", "log_file")  # written, or unused under Docker


def file_settings(config: Any, where: str = "") -> Iterator[tuple[str, str]]:
    """(key path, absolute path) for every setting that names a file or directory: keys
    ending in _path, _file(s), _dir(ectory), at any depth, values absolute paths."""
    if isinstance(config, dict):
        for key, value in config.items():
            here = f"{where}.{key}" if where else str(key)
            if key in NOT_READ:
                continue
            if str(key).endswith(FILE_KEY_SUFFIXES):
                values = value if isinstance(value, list) else [value]
                for n, item in enumerate(values):
                    if isinstance(item, str) and item.startswith("/"):
                        yield (f"{here}[{n}]" if isinstance(value, list) else here), item
            else:
                yield from file_settings(value, here)
    elif isinstance(config, list):
        for n, item in enumerate(config):
            yield from file_settings(item, f"{where}[{n}]")


def mount_of(mounts: tuple[FileMount, ...], container_path: str) -> FileMount | None:
    """The mount that shows `container_path` (the deepest one), or None."""
    best = None
    for m in mounts:
        if within(container_path, (m.target,)):
            if best is None or len(m.target) > len(best.target):
                best = m
    return best


def host_path(mount: FileMount, container_path: str) -> Path:
    rel = posixpath.relpath(posixpath.normpath(container_path), mount.target)
    return mount.source if rel == "." else mount.source / rel


def outside_mounts(stack: Stack, config: dict) -> list[tuple[str, str]]:
    """File settings that no mount (and nothing of ours) shows: Synapse looks for them in its
    image, which is right only for an image of the operator's own."""
    return [(key, value) for key, value in file_settings(config)
            if not within(value, SYNAPSE_OWN_PATHS) and mount_of(stack.mounts, value) is None]


def within(path: str, roots) -> bool:
    """Whether a container path is one of `roots` or below one."""
    path = posixpath.normpath(path)
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _readable(st: os.stat_result, need: int) -> bool:
    """Whether uid/gid 991 has `need` (a mask of r=4, x=1) on a file with this stat."""
    mode = st.st_mode
    if st.st_uid == SYNAPSE_UID:
        return (mode >> 6) & need == need
    if st.st_gid == SYNAPSE_UID:
        return (mode >> 3) & need == need
    return mode & need == need


def _walk(root: Path) -> Iterator[Path]:
    """The source and everything below it; a symlinked source is followed (Docker's bind
    mount follows it too), links below it are not."""
    yield root
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root.resolve()):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                yield Path(dirpath) / name


def check_sources(stack: Stack) -> str:
    """Check every mount's source; return a digest of the mounted contents (empty without
    mounts). Raises ConfigError on the first problem."""
    digest = hashlib.sha256()
    for n, m in enumerate(stack.mounts):
        key = f"mounts[{n}].source"
        if not m.source.exists():
            raise ConfigError(stack.stack_file, key, f"{m.source} does not exist",
                              "create it, or correct the path (relative to the stack file)")
        entries = 0
        real = m.source.resolve()
        for entry in _walk(m.source):
            entries += 1
            if entries > MAX_ENTRIES:
                raise ConfigError(stack.stack_file, key, f"{m.source} holds more than "
                                  f"{MAX_ENTRIES} entries", "mount only the config files "
                                  "Synapse needs, not data")
            if entry != m.source and entry.is_symlink() and \
                    not entry.resolve().is_relative_to(real):
                raise ConfigError(stack.stack_file, key, f"{entry} links to {entry.resolve()}, "
                                  "outside the mount (the containers would not see it)",
                                  "copy the file into the mounted directory instead")
            try:
                st = entry.stat()
            except OSError as err:
                raise ConfigError(stack.stack_file, key, f"{entry}: {err.strerror}",
                                  "remove the broken link or fix its target") from None
            is_dir = stat.S_ISDIR(st.st_mode)
            if not _readable(st, 5 if is_dir else 4):
                what = "directory" if is_dir else "file"
                raise ConfigError(stack.stack_file, key, f"{entry}: {what} not readable by "
                                  f"uid {SYNAPSE_UID} (Synapse's user in the containers)",
                                  f"chown {SYNAPSE_UID}:{SYNAPSE_UID} {entry}, or chmod "
                                  f"{'o+rx' if is_dir else 'o+r'} it")
            rel = "." if entry == m.source else str(entry.relative_to(real))
            digest.update(f"{n}\0{m.target}\0{rel}\0".encode())
            if not is_dir:
                with open(entry, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
    return digest.hexdigest() if stack.mounts else ""


def check_settings(stack: Stack, config: dict) -> None:
    """Every file setting Synapse will see (`config`: the rendered shared config) that points
    into a mount must name a host file that exists."""
    for key, value in file_settings(config):
        mount = mount_of(stack.mounts, value)
        if mount is not None and not host_path(mount, value).exists():
            raise ConfigError(stack.homeserver_file, key, f"{value} is in the mount of "
                              f"{mount.source}, but {host_path(mount, value)} does not exist",
                              "create that file, or correct the path")
