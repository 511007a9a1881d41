"""The limits every program runs under, and the cap on what a whole pool may take."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

# Cap on the memory all of a pool's programs can take together (default: half the RAM).
MEMORY_CAP_ENV = "EVOLFORGE_SANDBOX_MEMORY_CAP_MB"
MIB = 1024 * 1024


class SandboxLimits(BaseModel):
    """Limits applied to every program.

    cpu_s, memory_mb (address space), file_size_mb and open_files are rlimits of each process;
    wall_s and max_output_bytes hold for the program as a whole. max_processes counts the
    program's processes and threads together. Where the factory has a cgroup, memory_mb also
    bounds the memory of all the program's processes together; otherwise their sum is bounded
    by max_processes × memory_mb, which `Sandbox` checks against a cap at start-up.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_s: float = Field(5, gt=0, description="CPU seconds a program may use")
    wall_s: float = Field(10, gt=0, description="wall-clock seconds before it is killed")
    memory_mb: int = Field(512, gt=0, description="memory of a program (MiB)")
    file_size_mb: int = Field(16, gt=0, description="largest file a program may write (MiB)")
    max_processes: int = Field(8, gt=0, description="processes and threads of one program")
    open_files: int = Field(64, ge=8, description="open files of one process")
    max_output_bytes: int = Field(65536, gt=0, description="output kept of a program")


def memory_cap_mb() -> int:
    """The most memory all of one pool's programs may take together: `$EVOLFORGE_SANDBOX_
    MEMORY_CAP_MB`, by default half of the machine's RAM."""
    configured = os.environ.get(MEMORY_CAP_ENV)
    if configured:
        return int(configured)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MIB // 2
