"""Multi-process training through accelerate (`training.launcher.processes`): the launch
mechanics with small functions in two CPU processes (gloo), a failing rank's one-line error,
`processes` in the version, and (slow) SFT trained by two processes against the one-process
run: the same files, config and manifest fields."""

from __future__ import annotations

import json
import os

import pytest

from storage.datasets import DatasetStore
from storage.settings import home
from tasks.contracts import StageContext
from tasks.training import launch
from tasks.training.common import BaseModelSpec, TrainerParams
from tasks.training.config import TrainingConfig
from tasks.training.launch import LauncherParams, TrainingLaunchError
from tasks.training.sft import SftTrainParams, train_sft

CPU = TrainerParams(device="cpu")


# -- functions the launched ranks run (importable: the ranks import this module) ---------------


def fit_counting(ctx, params, rows, note, judge=None):
    """Every rank joins the process group; rank 0 reports progress; each rank counts itself
    and, with a judge, asks its own (scripted) engine one question."""
    from accelerate import PartialState

    state = PartialState(cpu=True)
    if judge is not None:
        import infra.engines as engines
        from infra.engines import ChatRequest
        from tests.fakes import ScriptedEngine

        engines._build = lambda config: ScriptedEngine(lambda r, i: "fine", identity="scripted")
        llm = ctx.engine(judge)
        question = f"rank {state.process_index}: is the step right?"
        llm.generate([ChatRequest(messages=({"role": "user", "content": question},))])
    ctx.progress(1, 2, "half")
    ctx.progress(2, 2, "done")
    return launch.Fitted(
        stats={
            "world": state.num_processes,
            "backend": state.backend,
            "rows": rows.height,
            "note": note,
            "rank": state.process_index,
        },
        counts={"ranks": 1, "by_rank": {f"rank{state.process_index}": 1}},
    )


def fit_failing(ctx, params):
    if os.environ.get("RANK") == "1":
        raise ValueError("rank 1 broke on purpose")
    return launch.Fitted(stats={})


class Recorder(StageContext):
    def __init__(self, root):
        super().__init__("train_test", "v1", root)
        self.seen = []

    def progress(self, done, total, description=None):
        self.seen.append((done, total, description))


def test_two_cpu_processes_run_one_function_with_gloo_and_sum_their_counts(tmp_path):
    import polars as pl

    from infra.engines import EngineConfig

    ctx = Recorder(tmp_path)
    rows = pl.DataFrame({"x": [1, 2, 3]})
    fitted = launch.fit(
        fit_counting, ctx, "test_model", LauncherParams(processes=2), params=CPU, rows=rows,
        note="hello", judge=EngineConfig(),
    )  # fmt: skip
    # rank 0's stats; the counters of both ranks summed; the frame and values arrived.
    assert fitted.stats == {"world": 2, "backend": "gloo", "rows": 3, "note": "hello", "rank": 0}
    assert fitted.counts == {"ranks": 2, "by_rank": {"rank0": 1, "rank1": 1}}
    assert fitted.model is None
    assert ctx.seen and ctx.seen[-1] == (2, 2, "done")
    # each rank's judge request counts as the stage's (its `engine` stats)
    assert ctx.engine_stats()["requests"] == 2 and ctx.engine_stats()["misses"] == 2
    job = ctx.work_dir("test_model") / launch.LAUNCH_DIR
    assert {p.name for p in job.glob("rank*.log")} == {"rank0.log", "rank1.log"}


def test_one_process_runs_the_function_here(tmp_path):
    import polars as pl

    ctx = Recorder(tmp_path)
    fitted = launch.fit(
        fit_counting, ctx, "test_model", LauncherParams(), params=CPU,
        rows=pl.DataFrame({"x": [1]}), note="here",
    )  # fmt: skip
    assert fitted.stats["world"] == 1 and fitted.stats["rank"] == 0
    assert not (tmp_path / "datasets" / "test_model" / ".work-v1" / launch.LAUNCH_DIR).exists()


def test_a_failing_rank_fails_the_stage_in_one_line_with_its_log_tail(tmp_path):
    ctx = Recorder(tmp_path)
    with pytest.raises(TrainingLaunchError) as caught:
        launch.fit(fit_failing, ctx, "test_model", LauncherParams(processes=2), params=CPU)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("train_test: training process rank 1 of 2 failed (exit ")
    assert "ValueError: rank 1 broke on purpose" in message
    assert "rank1.log" in message


def test_failure_line_falls_back_to_unfinished_ranks_and_the_launcher(tmp_path):
    (tmp_path / "rank0.log").write_text("ok\n")
    (tmp_path / "rank0.done").touch()
    (tmp_path / "rank1.log").write_text(
        "start\n" + "".join(f"line {i}\n" for i in range(20)) + "Killed\n"
    )
    line = launch.failure_line("train_sft", tmp_path, 2, -9)
    assert line.startswith("train_sft: training process rank 1 of 2 failed (exit -9): ")
    assert "line 15 | line 16 | line 17 | line 18 | line 19 | Killed" in line
    assert "line 14" not in line
    (tmp_path / "rank1.log").unlink()
    (tmp_path / launch.LAUNCHER_LOG).write_text("usage: accelerate launch\nbad option\n")
    assert "the accelerate launcher failed (exit 2): usage: accelerate launch | bad option" in (
        launch.failure_line("train_sft", tmp_path, 2, 2)
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tasks.training.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_processes_enter_the_version_and_the_setting_loads_from_a_profile(tiny):
    from flows.params import load_factory_params

    kwargs = {
        "sft_set": "sft_set@0123456789abcdef",
        "base_model": BaseModelSpec(name=str(tiny)),
        "params": SftTrainParams(),
    }
    one = train_sft.version(**kwargs)
    assert train_sft.version(launcher=LauncherParams(), **kwargs) == one
    assert train_sft.version(launcher=LauncherParams(processes=2), **kwargs) != one
    params = load_factory_params(None, ["training.launcher.processes=2"])
    assert params.training.launcher.processes == 2
    assert TrainingConfig().launcher.processes == 1
    with pytest.raises(Exception, match="processes"):
        load_factory_params(None, ["training.launcher.processes=0"])


def _files(folder):
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0] != "logs"
    )


@pytest.mark.slow
def test_sft_in_two_processes_writes_the_one_process_checkpoint_shape(evolforge_home, tiny):
    """Two gloo processes (about 30 s on two busy cores) against the one-process run."""
    from tests.tasks.training.test_sft import _sft_set

    store = DatasetStore(home())
    sft_set = _sft_set(store)
    params = SftTrainParams(max_steps=2, max_length=128, eval_rows=4, device="cpu")
    base = BaseModelSpec(name=str(tiny))
    one = train_sft.run(sft_set=sft_set, base_model=base, params=params)
    two = train_sft.run(
        sft_set=sft_set, base_model=base, params=params, launcher=LauncherParams(processes=2)
    )
    assert two.version != one.version and not two.cached
    a, b = (store.version_dir("sft_model", r.version) for r in (one, two))
    assert _files(a) == _files(b)
    assert list((a / "logs").iterdir()) and list((b / "logs").iterdir())
    assert json.loads((a / "config.json").read_text()) == json.loads(
        (b / "config.json").read_text()
    )
    ma, mb = store.manifest(one["sft_model"]), store.manifest(two["sft_model"])
    assert vars(ma).keys() == vars(mb).keys() and ma.kind == mb.kind == "model"
    assert ma.stats.keys() == mb.stats.keys()
    assert [f["path"] for f in ma.files if not f["path"].startswith("logs")] == [
        f["path"] for f in mb.files if not f["path"].startswith("logs")
    ]
    assert ma.params["launcher"] == {"processes": 1} and mb.params["launcher"] == {"processes": 2}
    assert ma.stats["processes"] == 1 and mb.stats["processes"] == 2
    assert mb.stats["steps"] == 2 and mb.stats["eval_rows"] == 4 and mb.stats["eval_loss"] > 0
    assert mb.stats["loss_first"] is not None
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(b)
    # rerun: a cache hit, nothing launched
    again = train_sft.run(
        sft_set=sft_set, base_model=base, params=params, launcher=LauncherParams(processes=2)
    )
    assert again.cached and again.version == two.version


def fit_sleeping(ctx, params, pids):
    """Each rank says where it is, then trains forever (until it is killed)."""
    import time
    from pathlib import Path

    Path(pids, f"rank{os.environ['RANK']}").write_text(str(os.getpid()))
    time.sleep(300)
    return launch.Fitted(stats={})


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return not any(line.startswith("State:\tZ") for line in fh)
    except FileNotFoundError:
        return False


def test_killing_the_stage_process_kills_the_launched_ranks(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from storage.settings import PROJECT_ROOT

    pids = tmp_path / "pids"
    pids.mkdir()
    script = (
        "from pathlib import Path\n"
        "from tasks.training import launch\n"
        "from tasks.training.common import TrainerParams\n"
        "from tests.tasks.training.test_launch import Recorder, fit_sleeping\n"
        f"ctx = Recorder(Path({str(tmp_path)!r}))\n"
        "launch.fit(fit_sleeping, ctx, 'test_model', launch.LauncherParams(processes=2),\n"
        f"           params=TrainerParams(device='cpu'), pids={str(pids)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    stage = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=PROJECT_ROOT)
    try:
        deadline = time.monotonic() + 90
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
            assert stage.poll() is None, "the stage process ended before its ranks started"
            time.sleep(0.2)
        ranks = [int(p.read_text()) for p in pids.iterdir()]
        assert len(ranks) == 2 and all(_alive(pid) for pid in ranks)
    finally:
        stage.send_signal(signal.SIGKILL)
        stage.wait()
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in ranks)


def test_more_processes_than_gpus_is_one_line_before_anything_starts(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    ctx = Recorder(tmp_path)
    with pytest.raises(ValueError, match=r"^training.launcher.processes is 2 but 1 GPU\(s\)"):
        launch.fit(
            fit_failing, ctx, "test_model", LauncherParams(processes=2), params=TrainerParams()
        )
    assert not (tmp_path / "datasets" / "test_model" / ".work-v1" / launch.LAUNCH_DIR).exists()
