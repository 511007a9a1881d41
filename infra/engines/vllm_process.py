"""Starting and stopping vLLM's processes from the factory: where vLLM's environment is, the
environment its processes get, and processes that die with this one and stop by their pid.

`infra.engines.vllm_worker` is the other side (it runs in vLLM's environment); the offline
engine's worker (`infra.engines.vllm_engine.VLLMWorker`) and the managed server
(`infra.engines.vllm_server`) are started with `start_process` and stopped with `stop_process`.
Each child leads its own process group, so stopping it by its pid ends what it started (the
server's engine core) too.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

from infra.processes import stop_group

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PYTHON_ENV = "EVOLFORGE_VLLM_PYTHON"
BUILD_HINT = (
    f"build vLLM's environment with `make vllm-venv` (.venv-vllm beside the checkout) "
    f"or point ${PYTHON_ENV} at a Python that has vLLM"
)
_PR_SET_PDEATHSIG = 1
_libc: Any = None  # loaded before any fork: the child between fork and exec only calls it
_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def find_vllm_python() -> str | None:
    """The interpreter of a vLLM environment: `$EVOLFORGE_VLLM_PYTHON`, else
    `.venv-vllm/bin/python` beside the checkout; None when neither exists."""
    configured = os.environ.get(PYTHON_ENV)
    if configured:
        if not Path(configured).is_file():
            raise FileNotFoundError(f"${PYTHON_ENV} names {configured}, which does not exist")
        return configured
    candidate = PROJECT_ROOT / ".venv-vllm" / "bin" / "python"
    return str(candidate) if candidate.is_file() else None


def _die_with_parent(sig: int) -> None:
    """Runs in the child between fork and exec: `sig` when the thread that forked it dies."""
    _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def child_env(kv_cache_gb: int, threads: int | None = None) -> dict[str, str]:
    """The environment of a worker or server: the project importable, vLLM's CPU KV cache
    bounded, its engine core in process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


def worker_command(python: str, args: list[str]) -> list[str]:
    """The command line of `infra.engines.vllm_worker` in the environment of `python`."""
    return [python, "-m", "infra.engines.vllm_worker", *args]


def start_process(
    argv: list[str],
    log_path: Path,
    env: dict[str, str],
    *,
    pass_fds: tuple[int, ...] = (),
    death_signal: int = signal.SIGTERM,
) -> subprocess.Popen:
    """Run `argv` leading its own process group, its output in `log_path`, dying with this
    process (`death_signal`).

    The kernel sends the death signal when the *thread* that forked the child ends, not the
    process; an engine is loaded by whichever thread first asks it to generate (a Prefect task's,
    a shard's), so the fork happens on one long-lived thread of this process instead."""
    global _libc, _spawner
    with _spawner_lock:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(1, "vllm-spawner")
    return _spawner.submit(_popen, argv, log_path, env, pass_fds, death_signal).result()


def _popen(
    argv: list[str],
    log_path: Path,
    env: dict[str, str],
    pass_fds: tuple[int, ...],
    death_signal: int,
) -> subprocess.Popen:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(PROJECT_ROOT),
            pass_fds=pass_fds,
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(death_signal),
        )


def stop_process(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """End `proc`'s process group by its pid: SIGTERM, then SIGKILL after `grace_s` (an engine
    core left behind by the server goes with it)."""
    stop_group(proc, grace_s)


def log_tail(path: Path, lines: int = 3, limit: int = 400) -> str:
    """The last non-empty lines of a log, joined into one line."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    joined = " | ".join(tail)
    return joined if len(joined) <= limit else "…" + joined[-limit:]
