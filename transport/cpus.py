"""How many CPUs this process may use: what sizes local workers and a farm host's worker processes."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, bounded by a cgroup CPU quota if any."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota()
    return cpus if quota is None else min(cpus, quota)


def _cgroup_cpu_quota() -> int | None:
    """CPUs granted by a cgroup quota (v2 cpu.max, else v1 cfs files), rounded up; None if unlimited."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
    except OSError:
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as g:
                quota, period = f.read().strip(), g.read().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except ValueError:
        return None
