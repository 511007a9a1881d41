"""The device check (`bench/gpu_check.sh`): its arguments, its precision verdicts, the wheel list
against what the check imports, the split of the wheels into carryable parts, and (slow) the
whole check on the CPU, as a lent GPU machine would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from bench import gpu_check, gpu_wheels

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_mode_parses_with_tiny_sizes_and_cuda_is_the_default(monkeypatch):
    monkeypatch.delenv("GPU_CHECK_DEVICE", raising=False)
    cuda = gpu_check.parse_args([])
    assert (cuda.device, cuda.precision, cuda.steps, cuda.layers) == ("cuda", "auto", 20, 8)
    cpu = gpu_check.parse_args(["--device", "cpu", "--steps", "3"])
    assert (cpu.device, cpu.steps, cpu.hidden, cpu.max_length) == ("cpu", 3, 32, 128)
    monkeypatch.setenv("GPU_CHECK_DEVICE", "cpu")
    assert gpu_check.parse_args([]).device == "cpu"
    for bad in (["--hidden", "30"], ["--steps", "0"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def _seen(**update):
    seen = {
        "weights": ["float32"], "weights_device": "cuda", "args_bf16": True, "forwards": 4,
        "autocast_forwards": 4, "autocast_dtypes": ["bfloat16"], "matmul_dtypes": ["bfloat16"],
    }  # fmt: skip
    return seen | update


def test_precision_verdicts_want_float32_weights_under_bf16_autocast_on_cuda():
    gpu_check.expect_precision("sft", _seen(), "cuda", bf16=True)
    failures = [
        _seen(weights=["bfloat16"]),  # weights stored in bf16: small updates round away
        _seen(weights_device="cpu"),  # trained on the CPU of a GPU machine
        _seen(args_bf16=False, autocast_forwards=0, autocast_dtypes=[]),
        _seen(autocast_forwards=3),  # one forward outside autocast
        _seen(matmul_dtypes=["float32"]),
        _seen(forwards=0, autocast_forwards=0),
    ]
    for seen in failures:
        with pytest.raises(gpu_check.CheckFailed):
            gpu_check.expect_precision("sft", seen, "cuda", bf16=True)
    fp32 = _seen(
        weights_device="cpu", args_bf16=False, autocast_forwards=0, autocast_dtypes=[],
        matmul_dtypes=["float32"],
    )  # fmt: skip
    gpu_check.expect_precision("irm", fp32, "cpu", bf16=False)
    with pytest.raises(gpu_check.CheckFailed):
        gpu_check.expect_precision("irm", fp32 | {"autocast_forwards": 1}, "cpu", bf16=False)


def _closure(roots):
    """{distribution: version} of `roots` and everything they require (no extras)."""
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = gpu_wheels.normalize(todo.pop())
        if name in seen:
            continue
        dist = distribution(name)
        seen[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_the_wheel_list_is_what_the_check_imports_beyond_torch_and_transformers():
    """Every listed wheel is pinned to the project's version, and the list is exactly the
    required modules' distributions and their requirements, less what the image's torch and
    transformers bring: a new import in the check without its wheel fails here."""
    listed = gpu_wheels.pinned()
    owners = packages_distributions()
    roots = {gpu_wheels.normalize(owners[m][0]) for m in gpu_check.REQUIRED_MODULES}
    image = _closure(["torch", "transformers"])
    needed = {n: v for n, v in _closure(roots).items() if n not in image}
    assert roots - set(image) <= set(listed)
    assert {n: listed[n] for n in needed} == needed
    extra = set(listed) - set(needed)
    # pydantic and its parts travel in case the image's transformers does not bring them.
    assert extra <= set(_closure(["pydantic"])), extra
    assert not set(listed) & {"torch", "transformers", "prefect"}


def test_pinned_refuses_a_line_without_a_version(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("# comment\ntrl==1.0  # why\n\n", encoding="utf-8")
    assert gpu_wheels.pinned(path) == {"trl": "1.0"}
    path.write_text("trl\n", encoding="utf-8")
    with pytest.raises(ValueError, match="name==version"):
        gpu_wheels.pinned(path)


def test_wheels_split_into_parts_under_the_limit_each_file_once():
    sizes = {"pyarrow.whl": 55, "polars_runtime.whl": 54, "duckdb.whl": 25, "pandas.whl": 12}
    sizes |= {f"small{i}.whl": 1 for i in range(6)}
    parts = gpu_wheels.split_parts(sizes, 56)
    assert sorted(n for part in parts for n in part) == sorted(sizes)
    assert all(sum(sizes[n] for n in part) <= 56 for part in parts)
    assert len(parts) == 3
    with pytest.raises(ValueError, match="over a part"):
        gpu_wheels.split_parts({"big.whl": 57}, 56)


def test_the_trainers_and_scorers_import_without_prefect():
    """The check hides Prefect (its wheels would not fit a run's carry): the stages it runs
    must import without it."""
    code = (
        "import sys; from bench.gpu_check import Hide, HIDDEN_MODULES;"
        "sys.meta_path.insert(0, Hide(HIDDEN_MODULES));"
        "import tasks.training.sft, tasks.training.irm, tasks.training.prm, tasks.training.rl;"
        "import infra.scoring, storage.datasets;"
        "assert 'prefect' not in sys.modules; print('ok')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_the_device_check_passes_end_to_end_on_the_cpu(precision):
    """The script as a lent machine runs it, on the CPU: every trainer and both scorers, with
    the precision probe (bf16 forces autocast on the CPU, so the probe is checked here)."""
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--device", "cpu", "--precision", precision],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    autocast = "autocast bf16" if precision == "bf16" else "autocast off"
    for name in ("sft", "irm", "prm", "grpo"):
        line = next(x for x in lines if x.startswith(f"{name}: "))
        assert "steps/s" in line and "weights float32 on cpu" in line and autocast in line
    assert any(x.startswith("prm scoring: 64 texts") for x in lines)
    assert lines[-1].startswith("gpu_check OK (cpu)")
