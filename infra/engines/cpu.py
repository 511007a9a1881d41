"""What the CPU can do, and the precision and thread count the embedded engine picks from it.

The machines this factory runs on change: some have native bfloat16 (AVX512_BF16 dot products, or
AMX tiles), where a bf16 model decodes about twice as fast as float32; others have AVX2 only,
where torch emulates bf16 and it is about three times slower than float32. `engine.dtype: auto`
therefore reads the CPU's flags (`/proc/cpuinfo`) and picks bf16 only where the CPU computes it
natively, float32 everywhere else. The choice is logged once per process.

Threads follow the CPUs the process may run on (`os.sched_getaffinity`: a container or `taskset`
limit, not the machine's core count).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("evolforge.engines")

# Either gives bf16 dot products in hardware: AVX512_BF16 (vdpbf16ps, Cooper Lake, Zen 4 and
# later) or AMX-BF16 tiles (Sapphire Rapids and later). Without them torch converts every bf16
# operand to float32 in software.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        return bool(self.flags & NATIVE_BF16_FLAGS)


def read_cpu_info(cpuinfo: str | None = None) -> CpuInfo:
    """The CPU's model name and feature flags, from `/proc/cpuinfo` (or the text given)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = "unknown", frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model, flags)


@functools.cache
def this_cpu() -> CpuInfo:
    """This machine's CPU, read once per process: every engine configuration's fingerprint and
    every `kind: auto` asks, and a process does not change CPUs."""
    return read_cpu_info()


def choose_dtype(requested: str, cpu: CpuInfo | None = None) -> tuple[str, str]:
    """The dtype to load the model in, and why: `auto` -> bf16 where native, else float32."""
    if requested != "auto":
        return requested, "configured"
    cpu = cpu or this_cpu()
    native = sorted(cpu.flags & NATIVE_BF16_FLAGS)
    if native:
        return "bfloat16", f"native bf16 ({', '.join(native)})"
    return "float32", "no native bf16 (no avx512_bf16/amx_bf16 flag)"


def usable_cpus() -> int:
    """CPUs this process may run on (affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def log_choice_once(what: str, message: str) -> None:
    """Log `message` the first time it is said about `what` in this process."""
    with _logged_lock:
        if (what, message) in _logged:
            return
        _logged.add((what, message))
    log.info("%s", message)


def _busy_and_own_ticks() -> tuple[int, int] | None:
    """(CPU ticks all processes spent busy, ticks this process spent), from /proc."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(f) for f in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return sum(ticks[:8]) - idle, int(own[11]) + int(own[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


class Contention:
    """How many cores other processes kept busy since the last look.

    The load average counts this process's own threads, so a rule on it throttles a process for
    its own work (two busy threads on two cores read as "oversubscribed"). This reads the
    machine's busy time (`/proc/stat`) minus this process's own (`/proc/self/stat`) between two
    looks; the first look measures over `first_window_s`.
    """

    def __init__(
        self,
        first_window_s: float = 0.2,
        read=_busy_and_own_ticks,
        clock=time.monotonic,
        hz: int | None = None,
    ):
        self.first_window_s = first_window_s
        self._read, self._clock = read, clock
        self._hz = hz or os.sysconf("SC_CLK_TCK")
        self._last: tuple[float, int, int] | None = None
        self._lock = threading.Lock()

    def others(self) -> float | None:
        with self._lock:
            now = self._read()
            if now is None:
                return None
            if self._last is None:
                self._last = (self._clock(), *now)
                time.sleep(self.first_window_s)
                now = self._read() or now
            start, busy0, own0 = self._last
            t = self._clock()
            elapsed = t - start
            self._last = (t, *now)
            if elapsed <= 0:
                return None
            return max(0.0, ((now[0] - busy0) - (now[1] - own0)) / self._hz / elapsed)


_contention = Contention()


def contended_threads(cpus: int | None = None, others: float | None = None) -> int:
    """Threads for torch: every usable CPU, or one when other processes keep at least half a
    core busy (torch's pool synchronises after every op, and a descheduled second thread makes
    each of a decode step's ~250 ops wait a scheduler slice)."""
    cpus = cpus or usable_cpus()
    if others is None:
        others = _contention.others()
    if others is None:  # no /proc: the load average, which counts this process too
        others = max(0.0, os.getloadavg()[0] - cpus)
    return 1 if cpus > 1 and others >= 0.5 else cpus
