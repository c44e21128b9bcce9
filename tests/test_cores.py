"""The free-core measurement that caps the torch backend's CPU threads (``mlx_asr.backends.torch.cores``).

Driven by a fake ``/proc/stat``, clock, CPU time and wait time, so each case is exact; the measured effect on
speed is in benchmarks/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mlx_asr.backends.torch.cores import QUOTA_EVERY, WINDOW, FreeCores, cpu_quota, run_delay

TICK = 100  # /proc/stat ticks per second (USER_HZ)
STEP = WINDOW + 0.05  # a window and a bit (exact sums of floats are not)


class Machine:
    """Two CPUs (and a third this process may not use) whose busy ticks, clock and our own CPU time we set."""

    def __init__(self, folder: Path) -> None:
        self.stat = folder / "stat"
        self.now = 0.0
        self.busy = [0.0, 0.0, 0.0]  # seconds per CPU
        self.own = 0.0
        self.waited = 0.0
        self.limit: float | None = None  # the cgroup's CPU quota
        self.write()

    def write(self) -> None:
        rows = ["cpu  1 2 3 4 5 6 7 8 9 10"]  # the total line is not read
        for n, seconds in enumerate(self.busy):
            ticks = int(round(seconds * TICK))
            user, system, irq, steal = ticks // 2, ticks - ticks // 2 - 2, 1, 1  # busy fields in several columns
            rows.append(f"cpu{n} {user} 0 {system} 999999 7 {irq} 0 {steal} 55 0")
        rows += ["intr 1 2 3", "", "ctxt 12345"]
        self.stat.write_text("\n".join(rows) + "\n")

    def run(self, seconds: float, ours: float, others: float, waited: float = 0.0) -> None:
        """``seconds`` pass; we use ``ours`` cores and wait ``waited`` cores, other processes use ``others``."""
        self.now += seconds
        self.own += ours * seconds
        self.waited += waited * seconds
        per_cpu = (ours + others) * seconds / 2
        self.busy[0] += per_cpu
        self.busy[1] += per_cpu
        self.busy[2] += seconds  # not ours to use: ignored
        self.write()

    def cores(self, threads: int = 2) -> FreeCores:
        return FreeCores(
            threads, str(self.stat), lambda: self.now, lambda: self.own, lambda: self.waited, cpus={0, 1}, tick=TICK,
            quota=lambda: self.limit,
        )


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    return Machine(tmp_path)


def test_idle_cores_keep_every_thread(machine: Machine) -> None:
    cores = machine.cores()
    assert cores.available and cores.threads() == 2
    for _ in range(5):
        machine.run(STEP, ours=1.9, others=0.1)
        assert cores.threads() == 2
    assert cores.others == pytest.approx(0.1, abs=0.02)


def test_a_busy_process_takes_a_thread_until_it_stops(machine: Machine) -> None:
    cores = machine.cores()
    machine.run(STEP, ours=1.33, others=0.67, waited=0.6)  # a busy loop beside our two threads
    assert cores.threads() == 1
    assert cores.others == pytest.approx(1.27, abs=0.02)
    machine.run(STEP, ours=1.0, others=1.0)
    assert cores.threads() == 1
    machine.run(STEP, ours=1.0, others=0.0)  # it stopped
    assert cores.threads() == 2


def test_hysteresis_between_drop_and_raise(machine: Machine) -> None:
    """A light load measured at 2 threads (inflated by our waits) keeps them; once at 1 thread, the same load
    measured there keeps 1."""
    cores = machine.cores()
    machine.run(STEP, ours=1.85, others=0.15, waited=0.25)  # 0.4 of a core wanted: stay at 2
    assert cores.threads() == 2
    machine.run(STEP, ours=1.7, others=0.3, waited=0.3)  # 0.6: drop
    assert cores.threads() == 1
    machine.run(STEP, ours=1.0, others=0.3)  # 0.3 at 1 thread: not low enough to come back
    assert cores.threads() == 1
    machine.run(STEP, ours=1.0, others=0.1)
    assert cores.threads() == 2


def test_never_below_one_or_above_most(machine: Machine) -> None:
    cores = machine.cores(threads=1)
    machine.run(STEP, ours=0.2, others=1.8, waited=2.0)
    assert cores.threads() == 1
    machine.run(STEP, ours=0.5, others=0.0)
    assert cores.threads() == 1


def test_a_quota_set_or_lifted_while_running_takes_effect(machine: Machine) -> None:
    machine.limit = 1.4  # rounds to 1 CPU
    cores = machine.cores()
    assert cores.threads() == 1 and cores.most == 1
    machine.limit = None
    machine.run(STEP, ours=1.0, others=0.0)
    assert cores.threads() == 1  # not re-read yet
    machine.run(QUOTA_EVERY, ours=1.0, others=0.0)
    assert cores.threads() == 2 and cores.most == 2
    machine.limit = 0.5
    machine.run(QUOTA_EVERY, ours=2.0, others=0.0)
    assert cores.threads() == 1 and cores.most == 1


def test_estimates_wait_for_a_full_window(machine: Machine) -> None:
    cores = machine.cores()
    machine.run(WINDOW / 2, ours=0.0, others=2.0)
    assert cores.threads() == 2  # too little history: no new estimate, and nothing read
    machine.run(STEP / 2, ours=0.0, others=2.0)
    assert cores.threads() == 1


def test_unreadable_table_means_no_cap(tmp_path: Path) -> None:
    cores = FreeCores(2, str(tmp_path / "missing"), cpus={0, 1})
    assert not cores.available and cores.threads() is None
    assert FreeCores(2, str(tmp_path / "missing"), cpus=set()).threads() is None


def test_table_vanishing_later_ends_the_cap(machine: Machine) -> None:
    cores = machine.cores()
    machine.run(STEP, ours=1.0, others=1.0)
    assert cores.threads() == 1
    machine.run(STEP, ours=1.0, others=0.0)
    machine.stat.unlink()
    assert cores.threads() is None
    assert not cores.available


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_this_machine_is_measurable() -> None:
    cores = FreeCores(2)
    assert cores.available and cores.cpus
    assert cores.threads() in (1, 2)
    assert run_delay() >= 0.0


def test_run_delay_sums_every_thread(tmp_path: Path) -> None:
    for name, text in (("1", "100 2000000000 3\n"), ("2", "5 500000000 1\n"), ("3", "garbage\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "schedstat").write_text(text)
    (tmp_path / "4").mkdir()  # a thread that ended between the listing and the read
    assert run_delay(str(tmp_path)) == pytest.approx(2.5)
    assert run_delay(str(tmp_path / "none")) == 0.0


def _cgroup(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_cpu_quota_of_cgroup_v2_is_the_tightest_on_the_path(tmp_path: Path) -> None:
    table = tmp_path / "cgroup"
    table.write_text("0::/pods/job\n")
    root = tmp_path / "fs"
    _cgroup(root, {"cpu.max": "max 100000\n"})
    _cgroup(root / "pods", {"cpu.max": "250000 100000\n"})
    _cgroup(root / "pods" / "job", {"cpu.max": "max 100000\n"})
    assert cpu_quota(str(table), str(root)) == pytest.approx(2.5)
    _cgroup(root / "pods" / "job", {"cpu.max": "50000 100000\n"})
    assert cpu_quota(str(table), str(root)) == pytest.approx(0.5)


def test_cpu_quota_of_cgroup_v1_and_namespaced_paths(tmp_path: Path) -> None:
    table = tmp_path / "cgroup"
    table.write_text("4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    root = tmp_path / "fs"
    # inside a container the cgroup namespace shows its own group at the mount's root, not under /docker/abc
    _cgroup(root / "cpu,cpuacct", {"cpu.cfs_quota_us": "150000\n", "cpu.cfs_period_us": "100000\n"})
    assert cpu_quota(str(table), str(root)) == pytest.approx(1.5)
    _cgroup(root / "cpu,cpuacct", {"cpu.cfs_quota_us": "-1\n"})
    assert cpu_quota(str(table), str(root)) is None


@pytest.mark.parametrize("text", ["", "garbage\n", "1:cpu:/\n"])
def test_cpu_quota_unknown_or_unlimited(tmp_path: Path, text: str) -> None:
    table = tmp_path / "cgroup"
    table.write_text(text)
    root = tmp_path / "fs"
    _cgroup(root / "cpu", {"cpu.cfs_quota_us": "oops\n", "cpu.cfs_period_us": "100000\n"})
    assert cpu_quota(str(table), str(root)) is None
    assert cpu_quota(str(tmp_path / "missing"), str(root)) is None
