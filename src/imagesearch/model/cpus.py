"""How many CPUs this process can really use (its CPU affinity and its cgroup's CPU quota, not the host's count),
how many physical cores lie under them, and what the CPU is (name, family/model, the flags the runtimes need).

Why: in a container limited to 2 CPUs on a 64-core node, os.cpu_count() and torch both see 64. A forward pass
split over 32 threads that the quota lets run 2 at a time is throttled into long stalls; sized to the quota it
runs at full speed. Kubernetes CPU limits and `docker run --cpus` are cgroup quotas (v2: cpu.max; v1:
cpu.cfs_quota_us), set on the container's cgroup or one of its parents.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
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


SYS_CPU = Path("/sys/devices/system/cpu")
PROC_CPUINFO = Path("/proc/cpuinfo")
# The flags the runtimes' speed depends on: vector width (avx2, avx512f), int8 and bf16 dot products (vnni,
# avx512_bf16), fp16 arithmetic (avx512_fp16), Intel's matrix units (amx_*), and the AVX2 bf16/fp16 conversions and
# int8 dot products of recent Intel cores without AVX-512 (avx_ne_convert, avx_vnni_int8: OpenVINO's "avx2_vnni_2").
RELEVANT_FLAGS = (
    "avx2",
    "avx_vnni",
    "avx_vnni_int8",
    "avx_ne_convert",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs a forward pass may use: `logical` (what available_cpus counts) and `physical`, the cores under
    them, where two SMT siblings (hyper-threads) count once."""

    logical: int
    physical: int

    @classmethod
    def detect(cls, sys_cpu: Path = SYS_CPU) -> CpuBudget:
        logical = available_cpus()
        return cls(logical, min(logical, physical_cores(sys_cpu)))


def physical_cores(sys_cpu: Path = SYS_CPU) -> int:
    """Physical cores under this process's CPU affinity: CPUs that are SMT siblings of each other count once.

    Why not torch.get_num_threads(): torch counts the host's cores, whatever this process may use.
    """
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in allowed:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            # The sibling list names the core (the same text for every CPU of one core), on every kernel since 2.6;
            # core_id alone repeats across dies and packages.
            cores.add((topology / "thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))  # no topology: count the CPU as a core
    return max(1, len(cores))


@dataclass(frozen=True)
class CpuModel:
    """What /proc/cpuinfo says about the CPU: its name, family and model numbers and the relevant flags."""

    name: str
    family: str
    model: str
    flags: tuple[str, ...]

    @classmethod
    def read(cls, cpuinfo: Path = PROC_CPUINFO) -> CpuModel:
        """The first processor's entry (all are alike on the servers this runs on); empty fields when unreadable."""
        try:
            text = cpuinfo.read_text()
        except OSError:
            text = ""
        fields: dict[str, str] = {}
        for line in text.splitlines():
            if not line.strip():
                if fields:
                    break  # the end of the first processor's entry
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        flags = set(fields.get("flags", "").split())
        return cls(
            name=fields.get("model name", "unknown CPU"),
            family=fields.get("cpu family", "?"),
            model=fields.get("model", "?"),
            flags=tuple(flag for flag in RELEVANT_FLAGS if flag in flags),
        )

    def describe(self, budget: CpuBudget | None = None) -> str:
        """One line for logs and benchmarks, e.g. "AMD EPYC (family 25 model 17): avx2 avx512f avx512_bf16; 2 CPUs
        (2 cores)"."""
        text = f"{self.name} (family {self.family} model {self.model}): {' '.join(self.flags) or 'no AVX2'}"
        if budget is not None:
            cores = "" if budget.physical == budget.logical else f" on {budget.physical} physical core(s)"
            text += f"; {budget.logical} CPUs{cores}"
        return text
