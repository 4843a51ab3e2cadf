"""The cores a process may use: its affinity mask and its cgroup's CPU quota (v1 and v2 file trees)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from matryoshka.cpus import cgroup_cpu_limit


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_cgroup_v2_quota_is_the_tightest_of_the_cgroup_and_its_ancestors(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "proc_cgroup"
    proc.write_text("0::/job/step\n")
    _tree(root, {"cpu.max": "max 100000\n", "job/cpu.max": "400000 100000\n", "job/step/cpu.max": "150000 100000\n"})
    assert cgroup_cpu_limit(root, proc) == 2  # 1.5 cores: two threads, each running three quarters of the time
    (root / "job/cpu.max").write_text("100000 100000\n")
    assert cgroup_cpu_limit(root, proc) == 1  # the parent's limit binds its children
    for rel in ("job/cpu.max", "job/step/cpu.max"):
        (root / rel).write_text("max 100000\n")
    assert cgroup_cpu_limit(root, proc) is None


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    root, proc = tmp_path / "cg", tmp_path / "proc_cgroup"
    proc.write_text("5:memory:/x\n4:cpu,cpuacct:/slurm/job7\n0::/\n")
    _tree(root, {"cpu,cpuacct/slurm/job7/cpu.cfs_quota_us": "300000\n",
                 "cpu,cpuacct/slurm/job7/cpu.cfs_period_us": "100000\n",
                 "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_limit(root, proc) == 3
    (root / "cpu,cpuacct/slurm/job7/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(root, proc) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path, tmp_path / "missing") is None
    (tmp_path / "proc_cgroup").write_text("0::/a\n")
    assert cgroup_cpu_limit(tmp_path / "cg", tmp_path / "proc_cgroup") is None


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("taskset") or not hasattr(os, "sched_getaffinity"),
                    reason="needs taskset (util-linux) and Linux affinity")
def test_a_process_pinned_to_one_core_starts_one_decode_thread():
    """``taskset`` (as SLURM's --cpus-per-task does) leaves os.cpu_count() at the machine's count."""
    code = ("import os; from matryoshka.cpus import usable_cpus; from matryoshka.cache.reader import default_threads; "
            "print(os.cpu_count(), usable_cpus(), default_threads())")
    out = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True, check=True)
    machine, usable, threads = map(int, out.stdout.split())
    assert (usable, threads) == (1, 1)
    assert machine == os.cpu_count()


@pytest.mark.slow
def test_torch_threads_fit_a_cgroup_quota(tmp_path):
    """torch follows the affinity mask but not a quota; the CLI sizes its pool (OMP_NUM_THREADS, if set, wins)."""
    root, proc = tmp_path / "cg", tmp_path / "proc_cgroup"
    proc.write_text("0::/pod\n")
    _tree(root, {"pod/cpu.max": "100000 100000\n"})  # one core's worth of CPU time
    code = ("import sys; from pathlib import Path; from matryoshka.cpus import fit_torch_threads; "
            "fit_torch_threads(Path(sys.argv[1]), Path(sys.argv[2])); import torch; print(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    run = lambda env: subprocess.run([sys.executable, "-c", code, str(root), str(proc)], env=env,  # noqa: E731
                                     capture_output=True, text=True, check=True).stdout.strip()
    assert run(env) == "1"
    assert run({**env, "OMP_NUM_THREADS": "2"}) == "2"
    (root / "pod/cpu.max").write_text("max 100000\n")  # no quota: torch's own choice
    own = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert run(env) == own
