"""Crash safety (kill -9 mid-training, the rerun resumes; no version until training finished),
checkpoint selection, device and precision, parameters that do not change the version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from storage.datasets import DatasetStore
from storage.settings import PROJECT_ROOT, home
from tasks.training import common
from tasks.training.common import BaseModelSpec, TrainerParams
from tasks.training.sft import SftTrainParams, train_sft


def test_last_complete_checkpoint_skips_and_removes_cut_off_folders(tmp_path):
    assert common.last_complete_checkpoint(tmp_path / "none") is None
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_text("w")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint of ours
    assert common.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert not (tmp_path / "checkpoint-6").exists()  # cut off by a crash: removed
    assert (tmp_path / "checkpoint-x").exists()


def test_cpu_runs_fp32_and_precision_can_be_forced():
    assert common.device_settings(TrainerParams(device="cpu")) == {
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
    }
    assert common.device_settings(TrainerParams(device="cpu", precision="bf16"))["bf16"] is True


def test_checkpoint_frequency_is_not_part_of_the_version():
    a = SftTrainParams(checkpoint_steps=2, keep_checkpoints=1).fingerprint()
    b = SftTrainParams(checkpoint_steps=50).fingerprint()
    assert a == b
    assert SftTrainParams(max_steps=9).fingerprint() != b


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tasks.training.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


TRAIN_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
import tasks.training.common as common
from storage.datasets import DatasetStore
from storage.settings import home
from tasks.training.common import BaseModelSpec
from tasks.training.sets import SftSetParams, SplitParams, build_sft_set
from tasks.training.sft import SftTrainParams, train_sft
from tests.tasks.training.synthetic import write_all

original = common.stage_progress

def slow_progress(ctx):
    callback = original(ctx)

    class Slow(type(callback)):
        def on_step_end(self, args, state, control, **kwargs):
            print(f"STEP {{state.global_step}}", flush=True)
            time.sleep(0.25)

    return Slow()

common.stage_progress = slow_progress
refs = write_all(DatasetStore(home()))
sft_set = build_sft_set.run(
    seeds=refs["seeds"], instructions=refs["instructions"], sft_answers=refs["sft_answers"],
    solutions=refs["solutions"], answers=refs["answers"], split=SplitParams(), params=SftSetParams(),
)["sft_set"]
print("SET", sft_set, flush=True)
train_sft.run(sft_set=sft_set, base_model=BaseModelSpec(name={tiny!r}), params={params})
print("DONE", flush=True)
"""

PARAMS = "SftTrainParams(max_steps=30, max_length=128, checkpoint_steps=3, keep_checkpoints=2)"


def test_kill_9_mid_training_then_rerun_resumes_from_the_last_checkpoint(
    evolforge_home, tiny, tmp_path
):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(TRAIN_SCRIPT).format(root=str(PROJECT_ROOT), tiny=str(tiny), params=PARAMS)
    )
    env = {**os.environ, "EVOLFORGE_HOME": str(evolforge_home), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        text=True, start_new_session=True,
    )  # fmt: skip
    sft_set = None
    deadline = time.monotonic() + 240
    try:
        for line in process.stdout:
            if line.startswith("SET "):
                sft_set = line.split()[1]
            if line.startswith("STEP ") and int(line.split()[1]) >= 8:
                break  # checkpoints 3 and 6 are on disk (and maybe one being written)
            assert time.monotonic() < deadline, "training never got to step 8"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    store = DatasetStore(home())
    assert store.versions("sft_model") == []  # no version of a training that did not finish
    work = list((evolforge_home / "datasets" / "sft_model").glob(".work-*"))
    assert len(work) == 1
    checkpoints = sorted((work[0] / common.CHECKPOINTS).glob("checkpoint-*"))
    assert checkpoints, "no checkpoint written before the kill"

    # The rerun (same version: same data, same parameters) resumes and finishes.
    params = eval(PARAMS, {"SftTrainParams": SftTrainParams})
    result = train_sft.run(sft_set=sft_set, base_model=BaseModelSpec(name=str(tiny)), params=params)
    assert result.version == work[0].name.removeprefix(".work-")
    assert result.stats["resumed_from_step"] in (6, 9) and result.stats["steps"] == 30
    assert store.versions("sft_model")[0].version == result.version
    assert not work[0].exists()  # the staging folder goes once the version is written
    history = common.read_training_log(store.version_dir("sft_model", result.version))
    assert next(h["step"] for h in history if "loss" in h) == 1  # the log spans both runs

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(store.version_dir("sft_model", result.version))


def test_base_model_identity_is_the_version_not_the_path(tiny, tmp_path):
    import shutil

    copy = Path(shutil.copytree(tiny, tmp_path / "copy"))
    # The same files under another name elsewhere are the same base model.
    assert (
        BaseModelSpec(name=str(copy)).fingerprint() == BaseModelSpec(name=str(tiny)).fingerprint()
    )
    assert str(tmp_path) not in BaseModelSpec(name=str(copy)).fingerprint()["model"]


def test_train_top_layers_freezes_everything_below(tiny):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    params = TrainerParams(train_top_layers=1)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    sizes = common.freeze_below(model, params)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm.")) for n in trainable)
    assert sizes["trainable_params"] < sizes["params"]
    head = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    common.freeze_below(head, params)
    assert head.score.weight.requires_grad and not head.model.embed_tokens.weight.requires_grad
    everything = common.freeze_below(AutoModelForCausalLM.from_pretrained(tiny), TrainerParams())
    assert everything["trainable_params"] == everything["params"]
    with pytest.raises(ValueError, match="lora or train_top_layers"):
        TrainerParams(train_top_layers=2, lora={})
