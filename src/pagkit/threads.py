"""``--threads``: one option with one meaning on every command.

``--threads N`` (N >= 1): torch computes with N threads in this process. ``--threads auto`` (the default): the
cores this process may run on (CPU affinity and cgroup quota) minus the busy ones (the 1-minute load average,
rounded), shared among the processes that torchrun started on this machine (``LOCAL_WORLD_SIZE``), at least 1;
when ``OMP_NUM_THREADS`` is set it decides instead. More threads than idle cores make torch's CPU kernels wait on
each other: with another process busy on a 2-core machine, 2-thread sampling ran 10x slower than 1 thread.

This module imports no torch until :func:`apply_threads` is called.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

AUTO = "auto"
HELP = (
    "torch threads per process: N >= 1, or auto (the idle cores, shared among torchrun's processes on this "
    "machine; OMP_NUM_THREADS wins when set)."
)


def parse_threads(value: str | int | None) -> int | None:
    """``auto``/None -> None; a whole number >= 1 -> itself; anything else is a ``ValueError``."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--threads must be auto or a whole number >= 1, got {value!r}") from None
    if n < 1 or str(n) != str(value).strip():
        raise ValueError(f"--threads must be auto or a whole number >= 1, got {value!r}")
    return n


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The cgroup (v2) CPU quota in whole cores, if one is set."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.floor(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpus()
    return max(1, min(cores, quota) if quota else cores)


def busy_cores() -> int:
    """Cores kept busy by other work: the 1-minute load average, rounded half up (0 when unknown)."""
    try:
        return math.floor(os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        return 0


def auto_threads(
    environ: Mapping[str, str] | None = None,
    cores: Callable[[], int] = available_cores,
    busy: Callable[[], int] = busy_cores,
) -> int:
    """The thread count of ``--threads auto`` (see the module docstring)."""
    env = os.environ if environ is None else environ
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp)
    try:
        local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    idle = cores() - busy()
    return max(1, idle // local)


def resolve_threads(value: str | int | None) -> int:
    """The number of threads ``--threads value`` means here and now."""
    n = parse_threads(value)
    return auto_threads() if n is None else n


def apply_threads(value: str | int | None) -> int:
    """Set torch's thread count for ``--threads value``; returns the count."""
    n = resolve_threads(value)
    import torch

    torch.set_num_threads(n)
    return n


class ThreadsType(click.ParamType):
    """``auto`` or a whole number >= 1."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            n = parse_threads(value)
        except ValueError:
            self.fail(f"{value!r} is not auto or a whole number >= 1", param, ctx)
        return AUTO if n is None else str(n)


def threads_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The ``--threads`` option, the same on every command."""
    return click.option("--threads", type=ThreadsType(), default=AUTO, show_default=True, help=HELP)
