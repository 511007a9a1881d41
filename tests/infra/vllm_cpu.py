"""What the tests of the real vLLM CPU build share: its environment (a missing one fails the
test, with how to build it) and the packaged SmolLM2 as an HF folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.engines.vllm_process import BUILD_HINT, find_vllm_python


def vllm_python() -> str:
    """The vLLM environment's interpreter; the test fails (never skips) without one."""
    python = find_vllm_python()
    if python is None:
        pytest.fail(f"the vllm tests run the real vLLM CPU build: {BUILD_HINT}")
    return python


def packaged_folder(models_dir: Path) -> str:
    """The packaged SmolLM2-135M-Instruct converted to an HF folder (once per session)."""
    from infra.models import convert_gguf, packaged_gguf

    return str(convert_gguf(packaged_gguf(), models_dir))


def text(content: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": content},)
