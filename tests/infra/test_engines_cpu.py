"""Precision and thread choices of the embedded engine, on faked CPUs."""

from __future__ import annotations

import logging

import pytest

from infra.engines.cpu import CpuInfo, choose_dtype, log_choice_once, read_cpu_info, usable_cpus

ZEN3 = "fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2 sha_ni vaes"
SKYLAKE_SP = ZEN3 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"
COOPER_LAKE = SKYLAKE_SP + " avx512_bf16"
SAPPHIRE_RAPIDS = SKYLAKE_SP + " avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_fp16"
GENOA = ZEN3 + " avx512f avx512bw avx512vl avx512_vnni avx512_bf16"


def _cpuinfo(model: str, flags: str, cores: int = 2) -> str:
    block = f"processor\t: {{n}}\nvendor_id\t: X\nmodel name\t: {model}\nflags\t\t: {flags}\n\n"
    return "".join(block.format(n=n) for n in range(cores))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (ZEN3, "float32"),  # AVX2 only: bf16 is emulated, ~3x slower than float32
        (SKYLAKE_SP, "float32"),  # AVX-512 without bf16 dot products
        (COOPER_LAKE, "bfloat16"),
        (SAPPHIRE_RAPIDS, "bfloat16"),
        (GENOA, "bfloat16"),
        ("", "float32"),  # flags unreadable: the safe choice
    ],
)
def test_auto_dtype_is_bf16_only_with_native_bf16(flags, expected):
    cpu = read_cpu_info(_cpuinfo("Some CPU", flags))
    dtype, why = choose_dtype("auto", cpu)
    assert dtype == expected
    assert why.startswith("native bf16") == (expected == "bfloat16")


@pytest.mark.parametrize("requested", ["float32", "bfloat16", "float16"])
def test_a_configured_dtype_is_kept_whatever_the_cpu(requested):
    for flags in (ZEN3, SAPPHIRE_RAPIDS):
        assert choose_dtype(requested, read_cpu_info(_cpuinfo("X", flags))) == (
            requested,
            "configured",
        )


def test_cpu_info_reads_model_and_flags_of_the_first_processor():
    cpu = read_cpu_info(_cpuinfo("AMD EPYC 7B13", ZEN3, cores=4))
    assert cpu == CpuInfo("AMD EPYC 7B13", frozenset(ZEN3.split()))
    assert not cpu.native_bf16
    assert read_cpu_info("") == CpuInfo("unknown", frozenset())


def test_this_machine_is_read():
    cpu = read_cpu_info()
    assert cpu.model != "unknown" and "sse2" in cpu.flags


def test_usable_cpus_follow_the_affinity_mask(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    assert usable_cpus() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set())
    assert usable_cpus() == 1


def test_a_choice_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="evolforge.engines"):
        log_choice_once("test", "picked float32 for the test")
        log_choice_once("test", "picked float32 for the test")
        log_choice_once("test", "picked bfloat16 for the test")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["picked float32 for the test", "picked bfloat16 for the test"]
