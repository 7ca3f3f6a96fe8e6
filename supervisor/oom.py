"""Was a container killed by the kernel's OOM killer? Ask the kernel, not only Docker.

Docker reports `State.OOMKilled` and an `oom` event, but on cgroup v1 it misses the OOM kill of
a container's PID 1 on many runs. The kernel's log says it every time, naming the memory cgroup,
which holds the container ID: `oom-kill:...,oom_memcg=/docker/<id>,task_memcg=/docker/<id>,...`.
Reading /dev/kmsg needs root (the daemon has it to reach Docker); without it the answer is
"don't know" (False).
"""

from __future__ import annotations

import errno
import os


def kernel_oom_killed(container_id: str, kmsg: str = "/dev/kmsg") -> bool:
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
            if b"oom-kill:" in record and needle in record:
                found = True
    finally:
        os.close(fd)
    return found
