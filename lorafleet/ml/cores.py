"""The cores this process may use, which is what its torch threads are sized to by default.

``os.cpu_count()`` is the machine's cores. A process pinned with ``taskset`` (or a cpuset) may use
fewer, and a container under a CPU quota (compose's ``cpus:``, a Kubernetes CPU limit) gets the
quota's share of time across all of them: torch sized to the machine then runs more threads than it
has cores, and OpenMP's spinning threads on oversubscribed cores cost far more than the parallelism
gains (two embedded runs side by side, each sized to the whole 2-core host, took 4 minutes for a round
that takes 25 s alone: ``benchmarks/results/first_run.md``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """This process's CPU affinity, capped by its cgroup's CPU quota rounded up; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota in cores of the cgroup this process sees at ``cgroup_root`` (cgroup v2
    ``cpu.max``, else v1 ``cpu/cpu.cfs_quota_us`` over ``cpu.cfs_period_us``); None when unlimited or
    unreadable."""
    try:
        v2 = cgroup_root / "cpu.max"
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            return None if quota == "max" else int(quota) / int(period or "100000")
        v1 = cgroup_root / "cpu"
        us = int((v1 / "cpu.cfs_quota_us").read_text())
        return None if us <= 0 else us / int((v1 / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
