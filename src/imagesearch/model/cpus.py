"""How many CPUs this process can really use: its CPU affinity and its cgroup's CPU quota, not the host's count.

Why: in a container limited to 2 CPUs on a 64-core node, os.cpu_count() and torch both see 64. A forward pass
split over 32 threads that the quota lets run 2 at a time is throttled into long stalls; sized to the quota it
runs at full speed. Kubernetes CPU limits and `docker run --cpus` are cgroup quotas (v2: cpu.max; v1:
cpu.cfs_quota_us), set on the container's cgroup or one of its parents.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def available_cpus(cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """CPUs this process may use: affinity, lowered to the cgroup CPU quota rounded up (at least 1)."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_self_cgroup)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return count


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its parents; None when unlimited or unknown."""
    quotas: list[float] = []
    for version, relative in _own_cgroups(proc_self_cgroup):
        base = cgroup_root if version == 2 else cgroup_root / "cpu"
        if not base.is_dir():
            continue
        directory = base / relative.lstrip("/")
        # Walk up to the hierarchy's root: a limit on a parent (a Kubernetes pod) binds the container too.
        while True:
            quota = _quota_v2(directory) if version == 2 else _quota_v1(directory)
            if quota is not None:
                quotas.append(quota)
            if directory == base or base not in directory.parents:
                break
            directory = directory.parent
    return min(quotas) if quotas else None


def _own_cgroups(proc_self_cgroup: Path) -> list[tuple[int, str]]:
    """(cgroup version, path) of this process's CPU cgroups, from lines like "0::/a/b" or "4:cpu,cpuacct:/a"."""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return [(2, "/")]  # no /proc: try the root of a cgroup v2 mount (a container's own namespace)
    found = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            found.append((2, path))
        elif "cpu" in controllers.split(","):
            found.append((1, path))
    return found


def _quota_v2(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _quota_v1(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
