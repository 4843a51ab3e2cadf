"""The CPU cores this process may use: what sizes the reader's decode threads, the writer's and torch's.

``os.cpu_count()`` counts the machine's cores, not this process's. Under SLURM (``--cpus-per-task``),
``taskset`` or ``numactl`` the process's affinity mask is smaller, and in a container (Docker's ``--cpus``,
a Kubernetes CPU limit) a cgroup quota caps its CPU time. Pools sized by the machine's count there start
many more busy threads than the process has cores: on a 128-core node with an 8-core limit, a reader
would start 96 decoders, and the quota would then stall them all in turns.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """Cores this process may run on: its affinity mask, capped by its cgroup's CPU quota."""
    quota = cgroup_cpu_limit(root, proc_cgroup)
    return max(1, min(_affinity(), quota) if quota else _affinity())


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def fit_torch_threads(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> None:
    """Size torch's CPU thread pool by the usable cores: call before torch is imported. torch follows
    the affinity mask but not a cgroup quota: in a pod limited to 4 cores of a 64-core node it would run
    32 threads, which the quota stalls in turns (CPU training, an LM forward on the CPU). Where a quota
    leaves fewer cores than the mask, this sets ``OMP_NUM_THREADS``, which torch reads when it starts
    its pool (importing torch here instead would cost every command, ``--help`` too, seconds); a value
    already set wins."""
    usable = usable_cpus(root, proc_cgroup)
    if "OMP_NUM_THREADS" not in os.environ and usable < _affinity():
        os.environ["OMP_NUM_THREADS"] = str(usable)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """The tightest CPU quota on this process's cgroup and its ancestors, in cores rounded up (a quota of
    1.5 cores lets two threads run three quarters of the time); None where there is none or no cgroup
    file can be read. Reads cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy, cpu.max in each cgroup's folder
            dirs = [root, root / "unified"]
            read = _v2_quota
        elif "cpu" in controllers.split(","):
            dirs = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            read = _v1_quota
        else:
            continue
        for top in dict.fromkeys(dirs):  # each mount point once, in order
            d = top / path.lstrip("/")
            while True:  # the cgroup, then each ancestor up to the mount point
                q = read(d)
                if q is not None:
                    limits.append(q)
                if d == top or top not in d.parents:
                    break
                d = d.parent
    return math.ceil(min(limits)) if limits else None


def _v2_quota(d: Path) -> float | None:
    try:
        quota, period = (d / "cpu.max").read_text().split()
        return None if quota == "max" else max(int(quota) / int(period), 1e-9)
    except (OSError, ValueError):
        return None


def _v1_quota(d: Path) -> float | None:
    try:
        quota = int((d / "cpu.cfs_quota_us").read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None
