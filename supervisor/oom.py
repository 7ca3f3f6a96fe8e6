"""Was a container killed by the kernel's OOM killer? Ask the kernel, not only Docker.

Docker reports `State.OOMKilled` and an `oom` event, but on cgroup v1 it misses the OOM kill of
a container's PID 1 on many runs. The kernel's log says it every time, naming the memory cgroup,
which holds the container ID: `oom-kill:...,oom_memcg=/docker/<id>,task_memcg=/docker/<id>,...`.
Reading /dev/kmsg needs root (the daemon has it to reach Docker); without it the answer is
"don't know" (False). Each record carries the kernel's timestamp (microseconds of the monotonic
clock, the one `time.monotonic()` reads), so a kill from an earlier run of the same container
is not taken for this one.
"""

from __future__ import annotations

import errno
import os


SLACK = 2.0  # seconds: the kernel's clock and ours are read at slightly different moments


def kernel_oom_killed(container_id: str, since: float | None = None,
                      kmsg: str = "/dev/kmsg") -> bool:
    """Whether the kernel logged an OOM kill in this container's memory cgroup (at or after
    `since`, a `time.monotonic()` value, when given)."""
    if not container_id:
        return False
    try:
        fd = os.open(kmsg, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    needle = container_id.encode()
    found = False
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break  # read everything the ring buffer holds
            except OSError as err:
                if err.errno == errno.EPIPE:
                    continue  # records were overwritten while reading: go on
                break
            if not record:
                break
            for line in record.splitlines():  # /dev/kmsg: one record per read; a file: many
                if b"oom-kill:" in line and needle in line and _after(line, since):
                    found = True
    finally:
        os.close(fd)
    return found


def _after(record: bytes, since: float | None) -> bool:
    """Whether a kmsg record ("prio,seq,usec,flags;text") is not older than `since`."""
    if since is None:
        return True
    try:
        usec = int(record.split(b";", 1)[0].split(b",")[2])
    except (IndexError, ValueError):
        return True  # no timestamp to judge by
    return usec / 1e6 >= since - SLACK
