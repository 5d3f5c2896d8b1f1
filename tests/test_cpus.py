"""CPU budget detection (cpus.py) over cgroup trees written to a temporary directory: the layouts of cgroup v1,
cgroup v2 with and without a private namespace, and a Kubernetes pod limit set on a parent cgroup; physical cores
from a CPU topology tree, and the CPU's name and flags from a cpuinfo file."""

from __future__ import annotations

import os
from pathlib import Path

from imagesearch.model.cpus import CpuBudget, CpuModel, available_cpus, cgroup_cpu_quota, physical_cores


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_private_namespace_reads_the_root_cpu_max(tmp_path: Path) -> None:
    write(tmp_path / "proc", "0::/\n")
    write(tmp_path / "cg" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_quota(tmp_path / "cg", tmp_path / "proc") == 1.5
    assert available_cpus(tmp_path / "cg", tmp_path / "proc") == min(2, len(os.sched_getaffinity(0)))


def test_cgroup_v2_takes_the_tightest_limit_up_the_tree(tmp_path: Path) -> None:
    write(tmp_path / "proc", "0::/kubepods/pod1/container\n")
    write(tmp_path / "cg" / "cpu.max", "max 100000\n")
    write(tmp_path / "cg" / "kubepods" / "pod1" / "cpu.max", "100000 100000\n")  # the pod's limit: 1 CPU
    write(tmp_path / "cg" / "kubepods" / "pod1" / "container" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(tmp_path / "cg", tmp_path / "proc") == 1.0
    assert available_cpus(tmp_path / "cg", tmp_path / "proc") == 1


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    write(tmp_path / "proc", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n")
    write(tmp_path / "cg" / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us", "250000\n")
    write(tmp_path / "cg" / "cpu" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path / "cg", tmp_path / "proc") == 2.5


def test_no_limit_leaves_the_affinity(tmp_path: Path) -> None:
    write(tmp_path / "proc", "3:cpu,cpuacct:/\n0::/\n")
    write(tmp_path / "cg" / "cpu" / "cpu.cfs_quota_us", "-1\n")
    write(tmp_path / "cg" / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path / "cg", tmp_path / "proc") is None
    assert available_cpus(tmp_path / "cg", tmp_path / "proc") == len(os.sched_getaffinity(0))
    # Nothing readable at all (no /proc, no cgroup mount): no limit either.
    assert cgroup_cpu_quota(tmp_path / "missing", tmp_path / "missing-proc") is None


def test_this_machine_reports_at_least_one_cpu() -> None:
    assert 1 <= available_cpus() <= (os.cpu_count() or 1)


def test_physical_cores_count_hyper_thread_siblings_once(tmp_path: Path) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    # Pair the CPUs this process may use as hyper-threads: (0, 1), (2, 3), ...
    for index, cpu in enumerate(allowed):
        pair = allowed[index - index % 2 : index - index % 2 + 2]
        write(tmp_path / f"cpu{cpu}" / "topology" / "thread_siblings_list", ",".join(map(str, pair)) + "\n")
    assert physical_cores(tmp_path) == (len(allowed) + 1) // 2


def test_physical_cores_without_topology_counts_each_cpu(tmp_path: Path) -> None:
    assert physical_cores(tmp_path / "absent") == len(os.sched_getaffinity(0))


def test_cpu_model_reads_name_numbers_and_relevant_flags(tmp_path: Path) -> None:
    entry = (
        "processor\t: {n}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 207\n"
        "model name\t: Intel(R) Xeon(R) Platinum 8581C CPU @ 2.30GHz\n"
        "flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 avx512_fp16 ht\n\n"
    )
    write(tmp_path / "cpuinfo", entry.format(n=0) + entry.format(n=1))
    cpu = CpuModel.read(tmp_path / "cpuinfo")
    assert (cpu.family, cpu.model) == ("6", "207")
    assert cpu.flags == ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16")  # no AMX: none listed
    assert cpu.describe(CpuBudget(logical=2, physical=1)) == (
        "Intel(R) Xeon(R) Platinum 8581C CPU @ 2.30GHz (family 6 model 207): avx2 avx512f avx512_vnni avx512_bf16 "
        "avx512_fp16; 2 CPUs on 1 physical core(s)"
    )
    assert CpuModel.read(tmp_path / "absent").describe() == "unknown CPU (family ? model ?): no AVX2"
