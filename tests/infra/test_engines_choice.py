"""`engine.kind: auto`: vLLM where it is installed and the CPU runs it, the embedded engine
elsewhere; resolved at validation, so a configuration, its fingerprint and the request cache's
keys name the engine that runs. The last test resolves `auto` on this machine's real vLLM
environment and generates through it."""

from __future__ import annotations

from pathlib import Path

import pytest

import infra.engines as engines
from infra.engines import EngineConfig, build_engine, release_accelerators
from infra.engines.base import ChatRequest, SamplingParams
from infra.engines.choice import PIN_ENV, Choice, choose_engine, resolve_auto
from infra.engines.cpu import read_cpu_info

AVX512_BF16 = read_cpu_info(
    "model name\t: test cpu\nflags\t: fpu sse avx avx2 avx512f avx512_bf16\n"
)
AVX2 = read_cpu_info("model name\t: test cpu\nflags\t: fpu sse avx avx2 fma\n")
AVX = read_cpu_info("model name\t: old cpu\nflags\t: fpu sse avx\n")


def choose(**overrides):
    args = dict(
        pinned="",
        in_process=False,
        find_python=lambda: "/v/bin/python",
        python_has_vllm=True,
        cpu=AVX2,
        machine="x86_64",
    )
    return choose_engine(**{**args, **overrides})


def test_vllm_where_its_environment_has_it_and_the_cpu_has_avx2():
    chosen = choose()
    assert (chosen.kind, chosen.cpu_build) == ("vllm", True)
    assert "/v/bin/python" in chosen.reason
    assert choose(cpu=AVX512_BF16).kind == "vllm"
    gpu = choose(in_process=True, find_python=lambda: None)  # a GPU machine's venv with vLLM in it
    assert (gpu.kind, gpu.cpu_build) == ("vllm", False)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"find_python": lambda: None}, "no vLLM environment"),
        ({"python_has_vllm": False}, "has no vllm package"),
        ({"cpu": AVX}, "no AVX2"),
        ({"machine": "aarch64"}, "x86-64"),
    ],
)
def test_the_embedded_engine_everywhere_else_with_the_reason(overrides, why):
    chosen = choose(**overrides)
    assert chosen.kind == "embedded"
    assert why in chosen.reason


def test_a_pin_overrides_the_machine_and_a_bad_pin_is_one_line(monkeypatch):
    assert choose(pinned="embedded").kind == "embedded"
    assert choose(pinned="vllm", find_python=lambda: None).kind == "vllm"
    with pytest.raises(ValueError, match=rf"\${PIN_ENV} is 'gpt'.*embedded, vllm"):
        choose(pinned="gpt")
    monkeypatch.setenv(PIN_ENV, "vllm")
    assert choose_engine(in_process=False).kind == "vllm"


def test_a_vllm_environment_that_does_not_exist_falls_back_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOLFORGE_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
    chosen = choose_engine(pinned="", in_process=False, cpu=AVX2, machine="x86_64")
    assert chosen.kind == "embedded"
    assert "missing" in chosen.reason


def test_on_the_cpu_build_dtype_auto_follows_the_cpus_native_bf16(monkeypatch):
    import infra.engines.choice as choice

    vllm = Choice("vllm", "test", cpu_build=True)
    monkeypatch.setattr(choice, "choose_dtype", lambda _: ("float32", "no native bf16"))
    assert resolve_auto({"batch_size": 8}, vllm) == {
        "batch_size": 8,
        "kind": "vllm",
        "dtype": "float32",
    }
    monkeypatch.setattr(choice, "choose_dtype", lambda _: ("bfloat16", "native bf16"))
    assert resolve_auto({"kind": "auto"}, vllm)["dtype"] == "bfloat16"
    assert resolve_auto({"dtype": "float32"}, vllm)["dtype"] == "float32"  # configured: kept
    # The embedded engine and vLLM on a GPU keep `auto` (resolved by the engine itself).
    assert "dtype" not in resolve_auto({}, Choice("embedded", "test"))
    assert "dtype" not in resolve_auto({}, Choice("vllm", "test"))


def test_a_validated_configuration_never_says_auto_and_its_fingerprint_names_the_engine(
    monkeypatch,
):
    monkeypatch.setenv(PIN_ENV, "embedded")
    embedded = EngineConfig()
    assert embedded.kind == "embedded"
    assert EngineConfig(kind="auto") == embedded
    assert EngineConfig.model_validate({"kind": "auto", "batch_size": 3}).kind == "embedded"
    monkeypatch.setenv(PIN_ENV, "vllm")
    vllm = EngineConfig(kind="auto", dtype="float32")
    assert vllm.kind == "vllm"
    assert vllm.fingerprint()["kind"] == "vllm"
    assert vllm.fingerprint() != EngineConfig(kind="embedded", dtype="float32").fingerprint()
    # A configuration that names its kind is left alone.
    assert EngineConfig(kind="embedded").kind == "embedded"
    # Resolved once, on the machine that validates: a copy (a Ray worker's) keeps the kind.
    monkeypatch.setenv(PIN_ENV, "embedded")
    assert EngineConfig.model_validate(vllm.model_dump()).kind == "vllm"


def test_a_run_says_which_engines_it_uses_and_why_auto_chose(monkeypatch):
    from infra.engines import describe_engines

    monkeypatch.setenv(PIN_ENV, "embedded")
    chosen = EngineConfig(batch_size=7)
    named = EngineConfig(kind="embedded", batch_size=9)
    lines = describe_engines({"a": chosen, "b": [named, chosen]})
    assert lines == [
        "engine: embedded, model packaged SmolLM2-135M-Instruct, dtype auto "
        f"(kind auto: ${PIN_ENV}=embedded)",
        "engine: embedded, model packaged SmolLM2-135M-Instruct, dtype auto",  # named: no why
    ]


def test_the_demo_profile_runs_on_auto(monkeypatch):
    from flows.params import load_factory_params

    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    monkeypatch.setenv(PIN_ENV, "embedded")
    assert load_factory_params(demo, []).engine.kind == "embedded"
    monkeypatch.setenv(PIN_ENV, "vllm")
    params = load_factory_params(demo, [])
    for engine in (params.engine, params.rewards.judge, params.evaluation.engine):
        assert engine.kind == "vllm"


@pytest.mark.vllm
@pytest.mark.slow
def test_auto_picks_the_real_vllm_environment_and_generates(monkeypatch, models_dir):
    """With this machine's `.venv-vllm` (`make test` builds it) and an x86-64 CPU with AVX2,
    `auto` becomes vLLM's CPU build, which loads and answers."""
    from tests.infra.vllm_cpu import packaged_folder, vllm_python

    python = vllm_python()
    chosen = choose_engine(pinned="", find_python=lambda: python)
    if chosen.kind != "vllm":
        pytest.fail(f"auto did not pick vLLM on this machine: {chosen.reason}")
    monkeypatch.delenv(PIN_ENV)
    engines._engines.clear()
    config = EngineConfig(model=packaged_folder(models_dir), max_model_len=1024)
    assert config.kind == "vllm"
    assert config.dtype == ("bfloat16" if read_cpu_info().native_bf16 else "float32")
    engine = build_engine(config)
    try:
        assert not engine.in_process
        out = engine.generate(
            [
                ChatRequest(
                    ({"role": "user", "content": "What is 2+3?"},), SamplingParams(max_tokens=8)
                )
            ]
        )
        assert out[0].ok and out[0].completions[0].completion_tokens > 0
    finally:
        release_accelerators()
        engines._engines.clear()
