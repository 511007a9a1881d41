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

import logging
import os
import threading
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


def choose_dtype(requested: str, cpu: CpuInfo | None = None) -> tuple[str, str]:
    """The dtype to load the model in, and why: `auto` -> bf16 where native, else float32."""
    if requested != "auto":
        return requested, "configured"
    cpu = cpu or read_cpu_info()
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
