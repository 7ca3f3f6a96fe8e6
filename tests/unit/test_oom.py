"""The kernel-log OOM check, against a file shaped like /dev/kmsg and the real device."""

from __future__ import annotations

import os

from supervisor.oom import kernel_oom_killed

CID = "2ee6c05c493806a6e927df7a832a0be12e652ca8f2bfb961a57ef10693780e05"


def test_finds_the_containers_oom_kill_line(tmp_path):
    log = tmp_path / "kmsg"
    log.write_text(
        "6,100,5935072588,-;oom_kill_process.cold+0x8/0x8a\n"
        f"6,101,5935074735,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset={CID},"
        f"mems_allowed=0,oom_memcg=/docker/{CID},task_memcg=/docker/{CID},task=python3\n")
    assert kernel_oom_killed(CID, kmsg=str(log))
    assert not kernel_oom_killed("0" * 64, kmsg=str(log))


def test_a_kill_before_the_run_started_is_not_this_runs(tmp_path):
    log = tmp_path / "kmsg"
    log.write_text(f"6,101,5935074735,-;oom-kill:constraint=CONSTRAINT_MEMCG,"
                   f"oom_memcg=/docker/{CID},task_memcg=/docker/{CID},task=python3\n")
    assert kernel_oom_killed(CID, since=5930.0, kmsg=str(log))  # logged at 5935.07 s
    assert kernel_oom_killed(CID, since=5936.0, kmsg=str(log))  # within the 2 s slack
    assert not kernel_oom_killed(CID, since=5940.0, kmsg=str(log))  # an earlier run's kill


def test_no_kernel_log_means_dont_know(tmp_path):
    assert not kernel_oom_killed(CID, kmsg=str(tmp_path / "missing"))
    assert not kernel_oom_killed("", kmsg=str(tmp_path / "missing"))


def test_reads_the_real_device_without_blocking():
    if not os.access("/dev/kmsg", os.R_OK):
        return
    assert kernel_oom_killed("no-such-container-id-" + "f" * 40) is False
