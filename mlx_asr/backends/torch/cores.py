"""The CPU cores other processes leave free, measured as we go: fewer PyTorch threads when they are busy.

PyTorch runs each parallel kernel on all of its threads. When another busy process shares the cores, one of
those threads waits for a core at every kernel, and the kernel waits for it. Long-spinning OpenMP workers
(see :mod:`.openmp`), the fastest choice on idle cores, make it worse: they keep the cores while they wait.
Measured on 2 Zen 4 cores (0.6B, w8a8 + quantized audio tower, 10 s clip, 40 tokens), beside one busy-looping
process: 10000 spins on 2 threads took RTF 0.70-0.75 (encoder 0.83-0.96 s, prefill 1.33-1.42 s, 126-133
ms/token); on 1 thread RTF 0.28-0.32 (0.43-0.45 s, 0.59-0.62 s, 46-57 ms/token). On idle cores 2 threads
give RTF 0.195-0.197 (37 ms/token). With this cap: RTF 0.191-0.205 on idle cores, 0.290-0.309 beside the busy
process (see benchmarks/README.md, "2026-12-04, evening").

So the torch backend on a CPU caps its threads at the cores that the other processes left free over the last
:data:`WINDOW` seconds or more. Linux only. The others' demand is the busy time in ``/proc/stat`` of the CPUs
this process may run on, minus this process's own CPU time, plus the time this process's threads waited for a
CPU (``/proc/self/task/*/schedstat``): what the others took from us. Beside one busy process on 2 cores
that is 1 thread; when it stops, 2 again.

A container's CPU limit (the cgroup's CFS quota, :func:`cpu_quota`) caps the count too: PyTorch counts the
machine's cores, and threads beyond the quota only wait for their turn. Under a 1-CPU quota (cgroup v1, same
machine and clip): RTF 0.357-0.398 on 2 threads, 0.271-0.297 capped at 1. The quota is re-read every
:data:`QUOTA_EVERY` seconds, so a limit changed while the process runs (``docker update --cpus``, an
in-place pod resize) takes effect.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

DROP_ABOVE = 0.45  # a thread leaves when others want more than this share of a core beyond the free ones
RAISE_BELOW = 0.2  # and comes back when they want less than this share of the core it would take
WINDOW = 0.2  # seconds of history behind each new estimate (/proc/stat counts in 10 ms ticks)
QUOTA_EVERY = 5.0  # seconds between reads of the cgroup's CPU quota (a container's limit can change while we run)
BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user, nice, system, irq, softirq, steal (guest time is within user)


def run_delay(tasks: str = "/proc/self/task") -> float:
    """Seconds the threads of this process spent runnable but waiting for a CPU (0 where the system does not say)."""
    total = 0
    try:
        names = os.listdir(tasks)
    except OSError:
        return 0.0
    for name in names:
        try:
            with open(f"{tasks}/{name}/schedstat", "rb") as stat:
                total += int(stat.read().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that ended meanwhile
            continue
    return total / 1e9


class FreeCores:
    """A thread count for PyTorch that leaves the cores other processes use to them (Linux only).

    Args:
        threads: PyTorch's thread count; the most threads to return is that, capped at ``quota()`` rounded
            to the nearest whole CPU (at least 1), re-read every :data:`QUOTA_EVERY` seconds.
        stat: the kernel's CPU time table.
        clock, own_cpu, waited: wall-clock seconds, this process's CPU seconds and the seconds its threads waited
            for a CPU (all threads); for tests.
        cpus, tick: the CPUs to count (default: those this process may run on) and ``/proc/stat``'s ticks per
            second (default: the system's); for tests.
        quota: the cgroup's CPU quota in CPUs, ``None`` for none (default: :func:`cpu_quota`); for tests.
    """

    def __init__(
        self,
        threads: int,
        stat: str = "/proc/stat",
        clock: Callable[[], float] = time.monotonic,
        own_cpu: Callable[[], float] = time.process_time,
        waited: Callable[[], float] = run_delay,
        cpus: set[int] | None = None,
        tick: int | None = None,
        quota: Callable[[], float | None] | None = None,
    ) -> None:
        self.torch_threads = threads
        self.stat = stat
        self.clock, self.own_cpu, self.waited = clock, own_cpu, waited
        self.cpus = _allowed_cpus() if cpus is None else cpus
        self.tick = tick or _clock_ticks()
        self.quota = quota or cpu_quota
        self.most = self._most()
        self._quota_read = self.clock()
        self.current = self.most
        self.others = 0.0  # cores other processes (and the hypervisor) used or we waited for, in the last window
        self._last = self._sample()

    @property
    def available(self) -> bool:
        """Whether this system lets the busy cores be measured."""
        return self._last is not None

    def threads(self) -> int | None:
        """Threads to use now (at least 1, at most ``most``); ``None`` where the cores cannot be measured.

        With hysteresis: the demand of others is measured high while we run more threads (our threads' waits
        count as theirs), so a thread leaves above :data:`DROP_ABOVE` and comes back below :data:`RAISE_BELOW`.
        """
        if self._last is None:
            return None
        if self.clock() - self._last[0] >= WINDOW:
            self._measure()
            if self._last is None:
                return None
            if self.clock() - self._quota_read >= QUOTA_EVERY:
                self.most, self._quota_read = self._most(), self.clock()
                self.current = min(self.current, self.most)
            free = len(self.cpus) - self.others
            lower, upper = int(free + DROP_ABOVE), int(free + RAISE_BELOW)
            if self.current > lower:
                self.current = max(1, lower)
            elif self.current < upper:
                self.current = min(self.most, upper)
        return self.current

    def _most(self) -> int:
        """PyTorch's thread count, capped at the CPU quota: more threads than it allows only wait for their turn."""
        limit = self.quota()
        return self.torch_threads if limit is None else min(self.torch_threads, max(1, int(limit + 0.5)))

    def _measure(self) -> None:
        sample = self._sample()
        if sample is None or self._last is None:
            self._last = sample  # unreadable now: no more estimates
            return
        wall, busy, own, waited = (now - before for now, before in zip(sample, self._last, strict=True))
        self._last = sample
        if wall > 0:
            self.others = (max(0.0, busy - own) + max(0.0, waited)) / wall

    def _sample(self) -> tuple[float, float, float, float] | None:
        """(wall s, busy CPU s of our CPUs, our CPU s, s our threads waited for a CPU), ``None`` where unreadable."""
        if not self.cpus:
            return None
        try:
            with open(self.stat, "rb") as table:
                lines = table.read().splitlines()
        except OSError:
            return None
        ticks = 0
        for line in lines:
            name, _, fields = line.partition(b" ")
            index = name[3:]
            if name.startswith(b"cpu") and index.isdigit() and int(index) in self.cpus:
                values = fields.split()
                ticks += sum(int(values[i]) for i in BUSY_FIELDS if i < len(values))
        return self.clock(), ticks / self.tick, self.own_cpu(), self.waited()


def cpu_quota(cgroups: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs per period this process's cgroups let it use (CFS quota; the tightest on the path up to the root),
    ``None`` when unlimited or unknown. cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us``)."""
    try:
        with open(cgroups, encoding="utf-8") as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "-", "")
        if controllers == "":
            mounts = [Path(root)]
        elif "cpu" in controllers.split(","):
            mounts = [Path(root, controllers), Path(root, "cpu")]
        else:
            continue
        for mount in mounts:
            folder = mount / path.lstrip("/")
            while True:
                limits.append(_quota_in(folder, v2=controllers == ""))
                if folder == mount:
                    break
                folder = folder.parent
    found = [limit for limit in limits if limit is not None]
    return min(found) if found else None


def _quota_in(folder: Path, v2: bool) -> float | None:
    """The CPU quota one cgroup folder sets, in CPUs (``None``: unlimited, or no such folder)."""
    try:
        if v2:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
        else:
            quota, period = ((folder / name).read_text().strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        if quota in ("max", "-1") or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _allowed_cpus() -> set[int]:
    """The CPUs this process may run on (empty where the system does not say)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - macOS, Windows
        return set()


def _clock_ticks() -> int:
    """``/proc/stat``'s ticks per second (USER_HZ)."""
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - systems without /proc/stat anyway
        return 100
