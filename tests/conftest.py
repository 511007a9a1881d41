"""Shared test harness: a temporary EVOLFORGE_HOME per test, Prefect's test harness per session,
offline Hugging Face, and the scripted fake engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# `engine.kind: auto` (the default) becomes the embedded engine in the suite, whatever this
# machine has installed: tests that exercise vLLM name it (`kind: vllm`, marker `vllm`), and
# tests/infra/engines/test_choice.py runs `auto` against the real vLLM environment.
os.environ.setdefault("EVOLFORGE_AUTO_ENGINE", "embedded")

from tests.s3_server import s3_home, s3_server  # noqa: F401  (a home on a test S3 server)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def models_dir(model_home) -> Path:
    """One folder for converted models per test session: the GGUF → HF conversion runs once."""
    folder = model_home / "models"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(autouse=True)
def evolforge_home(tmp_path, monkeypatch, models_dir) -> Path:
    home = tmp_path / "evolforge-home"
    home.mkdir()
    monkeypatch.setenv("EVOLFORGE_HOME", str(home))
    monkeypatch.setenv("EVOLFORGE_MODELS", str(models_dir))
    return home


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API (SQLite) shared by the tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def model_home(tmp_path_factory) -> Path:
    """A home shared across the slow tests so the GGUF is converted to an HF folder once."""
    return tmp_path_factory.mktemp("model-home")


@pytest.fixture(scope="session")
def pool():
    """A math-verify pool for the tests; short inner timeouts keep pathological cases quick
    (real pairs take well under 0.1 s)."""
    from tasks.solutions.answers import equivalence_pool

    with equivalence_pool(workers=2, parse_timeout_s=1, verify_timeout_s=1) as p:
        yield p
