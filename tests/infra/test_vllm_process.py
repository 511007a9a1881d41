"""vLLM's processes without vLLM: finding its environment, children that die with the process
that started them (even when the thread that asked has ended) and stop by their pid with their
group, the worker's wire format, the log's tail, and the new settings' place in the
fingerprint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest

import infra.engines.vllm_process as vllm_process
from infra.engines import EngineConfig
from infra.engines.base import ChatRequest, SamplingParams
from infra.engines.vllm_cpu import cpu_max_num_seqs
from infra.engines.vllm_cpu import llm_options as _llm_options
from infra.engines.vllm_engine import (
    VLLMEngine,
    output_from_dict,
    request_to_dict,
    to_response,
    vllm_identity,
)
from infra.engines.vllm_process import (
    PYTHON_ENV,
    find_vllm_python,
    log_tail,
    start_process,
    stop_process,
)
from infra.engines.vllm_worker import output_to_dict, request_from_dict

ROOT = Path(__file__).resolve().parents[2]


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait_until(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_the_environment_comes_from_the_variable_or_beside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv(PYTHON_ENV, raising=False)
    monkeypatch.setattr(vllm_process, "PROJECT_ROOT", tmp_path)
    assert find_vllm_python() is None
    python = tmp_path / ".venv-vllm" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    assert find_vllm_python() == str(python)
    monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=rf"\${PYTHON_ENV} names .*nowhere"):
        find_vllm_python()


def test_no_vllm_here_and_no_environment_says_how_to_build_one(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.delenv(PYTHON_ENV, raising=False)
    monkeypatch.setattr(vllm_process, "PROJECT_ROOT", tmp_path)
    with pytest.raises(ImportError, match=r"evolforge\[vllm\].*make vllm-venv"):
        VLLMEngine(str(tmp_path))


def test_without_vllm_here_the_engine_runs_in_the_environment(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    python = tmp_path / "python"
    python.write_text("")
    monkeypatch.setenv(PYTHON_ENV, str(python))
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    engine = VLLMEngine(str(model), dtype="float32")
    assert not engine.in_process and engine.worker is None  # started when it first generates
    assert engine.identity.endswith("+vllm-float32")


def test_a_child_outlives_the_thread_that_started_it_and_dies_with_its_process(tmp_path):
    """The parent starts a child from a thread that then ends (as a Prefect task's thread
    does): the child lives on; the parent is killed: the child goes too."""
    parent = tmp_path / "parent.py"
    parent.write_text(
        textwrap.dedent(
            f"""
            import sys, threading, time
            from pathlib import Path
            from infra.engines.vllm_process import start_process
            started = []
            def start():
                started.append(start_process(
                    [sys.executable, "-c", "import time; time.sleep(120)"],
                    Path({str(tmp_path / "child.log")!r}), {{}}))
            thread = threading.Thread(target=start)
            thread.start()
            thread.join()
            print(started[0].pid, flush=True)
            time.sleep(120)
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.PIPE, env=env)
    try:
        child = int(proc.stdout.readline())
        time.sleep(0.5)
        assert running(child)  # its starting thread has ended; it has not
        proc.kill()
        proc.wait(10)
        assert wait_until(lambda: not running(child))
    finally:
        proc.kill()
        proc.wait(10)


def test_stop_process_ends_the_group_by_the_leaders_pid(tmp_path):
    marker = tmp_path / "grandchild.pid"
    script = f"sleep 120 & echo $! > {marker}; wait"
    proc = start_process(["sh", "-c", script], tmp_path / "log", dict(os.environ))
    assert wait_until(lambda: marker.is_file() and marker.read_text().strip())
    grandchild = int(marker.read_text())
    assert running(grandchild)
    stop_process(proc, grace_s=5)
    assert proc.returncode == -signal.SIGTERM
    assert wait_until(lambda: not running(grandchild))


def test_a_log_tail_is_one_line(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("starting\n\nTraceback\n  File x\nValueError: no weights\n\n")
    assert log_tail(log) == "Traceback | File x | ValueError: no weights"
    assert log_tail(tmp_path / "missing.log") == ""
    log.write_text("x" * 1000 + "\n")
    assert len(log_tail(log)) == 401


def test_the_wire_format_round_trips_requests_and_outputs():
    request = ChatRequest(
        ({"role": "user", "content": "### Instruction:\nhi"},),
        SamplingParams(temperature=0.7, n=2, seed=9, max_tokens=30, stop=("###",)),
        json_schema={"type": "object"},
        template_version="t1",
        raw=True,
    )
    back = request_from_dict(request_to_dict(request))
    assert (back.messages, back.sampling, back.json_schema, back.raw) == (
        request.messages,
        request.sampling,
        request.json_schema,
        True,
    )
    vllm_output = types.SimpleNamespace(
        prompt_token_ids=[1, 2, 3, 4],
        outputs=[
            types.SimpleNamespace(text="{}", token_ids=[5, 6], finish_reason="stop"),
            types.SimpleNamespace(text="{", token_ids=[7], finish_reason="length"),
        ],
    )
    response = to_response(request, output_from_dict(output_to_dict(vllm_output)), 0.1)
    assert response.prompt_tokens == 4
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in response.completions] == [
        ("{}", "stop", 2),
        ("{", "length", 1),
    ]
    assert response.error.startswith("json_schema: sample 1 invalid")


def test_speed_settings_stay_out_of_the_fingerprint_and_dtype_in_it():
    base = EngineConfig(kind="vllm_server", model="org/model")
    tuned = EngineConfig(
        kind="vllm_server",
        model="org/model",
        kv_cache_gb=4,
        enforce_eager=False,
        startup_timeout_s=60,
        max_concurrency=2,
    )
    assert base.fingerprint() == tuned.fingerprint()
    assert (
        base.fingerprint()
        != EngineConfig(kind="vllm_server", model="org/model", dtype="float32").fingerprint()
    )
    assert vllm_identity("m@sha", "auto") == "m@sha+vllm-auto"


def logged(message: str) -> Path:
    """The log an error names (kept after a failure); the test removes it."""
    log = Path(message.split("(log ", 1)[1].split(": ", 1)[0])
    assert log.is_file()
    log.unlink()
    return log


def fake_python(tmp_path: Path, body: str) -> Path:
    """An executable standing in for vLLM's interpreter (it ignores its arguments)."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


@pytest.fixture
def model_folder(tmp_path) -> str:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return str(folder)


def test_a_server_that_exits_before_answering_fails_in_one_line(
    tmp_path, monkeypatch, model_folder
):
    from infra.engines.vllm_server import VLLMServerEngine

    python = fake_python(tmp_path, "echo 'loading'; echo 'ValueError: no weights'; exit 3")
    monkeypatch.setenv(PYTHON_ENV, str(python))
    engine = VLLMServerEngine(model_folder)
    with pytest.raises(RuntimeError) as failed:
        engine.load()
    message = str(failed.value)
    assert "\n" not in message and "exited with code 3 before answering" in message
    assert message.endswith("loading | ValueError: no weights)")
    assert engine.proc is None
    logged(message)


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path, monkeypatch, model_folder):
    from infra.engines.vllm_server import VLLMServerEngine

    marker = tmp_path / "pid"
    python = fake_python(tmp_path, f"echo $$ > {marker}; echo 'still loading'; exec sleep 120")
    monkeypatch.setenv(PYTHON_ENV, str(python))
    engine = VLLMServerEngine(model_folder, startup_timeout_s=1.5)
    with pytest.raises(TimeoutError, match=r"did not answer /v1/models within 2 s") as failed:
        engine.load()
    assert "\n" not in str(failed.value) and str(failed.value).endswith(": still loading)")
    logged(str(failed.value))
    assert not running(int(marker.read_text()))  # stopped by its pid, not left behind
    assert engine.proc is None


def test_a_worker_that_dies_while_loading_fails_in_one_line(tmp_path, monkeypatch, model_folder):
    monkeypatch.setitem(sys.modules, "vllm", None)
    python = fake_python(tmp_path, "echo 'Traceback'; echo 'ImportError: no vllm here'; exit 1")
    monkeypatch.setenv(PYTHON_ENV, str(python))
    engine = VLLMEngine(model_folder)
    with pytest.raises(RuntimeError) as failed:
        engine.load()
    message = str(failed.value)
    assert "\n" not in message and "exited with code 1 while starting" in message
    assert message.endswith("Traceback | ImportError: no vllm here)")
    logged(message)


def _config_folder(tmp_path: Path, dtype: str) -> str:
    import json

    folder = tmp_path / f"model-{dtype}"
    folder.mkdir()
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "torch_dtype": dtype,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_on_a_cpu_vllm_runs_no_more_sequences_than_its_kv_cache_holds_at_full_length(tmp_path):
    """vLLM's CPU build dies when it preempts a seeded request (a CPU generator has no offset to
    rewind): the worker caps the sequences at once to what the KV cache holds at full length.
    SmolLM2-135M's shape: 30 layers x 3 KV heads x 64 = 5,760 values a token for the keys and as
    many for the values: 23,040 bytes in bfloat16, 46,080 in float32 (vLLM reported 23,296
    tokens for 1 GiB in float32)."""
    bf16 = _config_folder(tmp_path, "bfloat16")
    assert cpu_max_num_seqs({"model": bf16, "max_model_len": 2048}, 1) == 2**30 // 23040 // 2048
    assert cpu_max_num_seqs({"model": bf16, "max_model_len": 2048}, 1) == 22
    f32 = {"model": bf16, "dtype": "float32", "max_model_len": 2048}
    assert cpu_max_num_seqs(f32, 1) == 11 and cpu_max_num_seqs(f32, 4) == 45
    # The model's own context when max_model_len is unset; at least one sequence.
    assert cpu_max_num_seqs({"model": bf16}, 1) == 5
    assert cpu_max_num_seqs({"model": bf16, "dtype": "float32", "max_model_len": 32768}, 1) == 1
    assert cpu_max_num_seqs({"model": str(tmp_path / "missing")}, 1) is None
    # The worker passes it to vllm.LLM on a CPU (an explicit setting wins), never on a GPU.
    assert _llm_options({"model": bf16, "max_model_len": 2048}, "cpu")["max_num_seqs"] == 22
    assert _llm_options({"model": bf16, "max_num_seqs": 3}, "cpu")["max_num_seqs"] == 3
    assert "max_num_seqs" not in _llm_options({"model": bf16, "max_model_len": 2048}, "cuda")
    # And prefills each prompt in one step (a partial prefill rewinds a seeded generator too):
    # chunked prefill off, a step's budget at least one whole context.
    cpu = _llm_options({"model": bf16, "max_model_len": 2048}, "cpu")
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] == 4096
    assert _llm_options({"model": bf16}, "cpu")["max_num_batched_tokens"] == 8192
    gpu = _llm_options({"model": bf16, "max_model_len": 2048}, "cuda")
    assert "enable_chunked_prefill" not in gpu and "max_num_batched_tokens" not in gpu
