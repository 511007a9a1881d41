"""Training-set builders: rows, labels, the CoT/PoT mix, one held-out line by root seed across
every set, counts that reconcile, clear errors; and trl's own dataset preparation accepts them."""

from __future__ import annotations

import polars as pl
import pytest

from storage.datasets import DatasetStore
from storage.settings import home
from tasks.training import sets
from tasks.training.records import IrmExample, PrmExample, RlPrompt, SftExample
from tasks.training.sets import (
    PrmStepsParams,
    RlPromptsParams,
    SftSetParams,
    SplitParams,
)
from tests.tasks.training.synthetic import frames, write_all

SPLIT = SplitParams(test_fraction=0.3, seed=0)


@pytest.fixture()
def data():
    return frames()


def _held_out(data):
    return sets.held_out_for(data["instructions"], SPLIT)


def test_sft_set_rows_prompts_and_completions(data):
    frame, stats = sets.sft_set_frame(
        data["instructions"],
        data["answers"],
        data["solutions"],
        data["seeds"],
        data["sft_answers"],
        SftSetParams(pot_ratio=0.0),
        _held_out(data),
    )
    assert frame.schema == SftExample.schema()
    # 6 seeds + 6 verified evolutions (the ".b" evolutions are unverified).
    assert frame.height == 12 and stats["left_out"] == {"unverified": 6}
    assert stats["candidates"] == frame.height + sum(stats["left_out"].values())
    rows = {r["id"]: r for r in frame.to_dicts()}
    seed = rows["s0:cot"]
    assert seed["source"] == "sft_answer" and seed["solution_id"] is None
    assert seed["prompt"].endswith(
        "### Instruction:\nWhat is 3 + 5?\n\n### Response: Let's think step by step."
    )
    assert seed["completion"] == "\nStep 1: 3 + 5 = 8.\nThe answer is: 8"
    # s5 has no SFT answer: its verified CoT solution (the majority matched the reference) is used.
    assert rows["s5:cot"]["source"] == "solution"
    evolved = rows["s0.r1.a:cot"]
    assert (
        evolved["solution_id"] == "s0.r1.a:0"
    )  # the planted wrong sample 1 is not in the majority
    assert evolved["completion"].endswith("The answer is: 10") and evolved["answer"] == "10"
    assert "s0.r1.b:cot" not in rows


def test_sft_set_mixes_programs_by_ratio(data):
    args = (
        data["instructions"],
        data["answers"],
        data["solutions"],
        data["seeds"],
        data["sft_answers"],
    )
    all_pot, stats = sets.sft_set_frame(*args, SftSetParams(pot_ratio=1.0), _held_out(data))
    assert set(all_pot["kind"]) == {"pot"} and stats["by_kind"] == {"pot": 12}
    row = all_pot.filter(pl.col("id") == "s0.r1.a:pot").row(0, named=True)
    assert row["prompt"].endswith("### Response: Let's write a program.")
    assert row["completion"] == "\n```python\nprint(3 + 5 + 2)\n```"
    _half, stats = sets.sft_set_frame(*args, SftSetParams(pot_ratio=0.5, seed=3), _held_out(data))
    assert 0 < stats["by_kind"].get("pot", 0) < 12 and sum(stats["by_kind"].values()) == 12
    # Without PoT solutions every instruction falls back to its CoT rationale.
    no_pot = data["solutions"].filter(pl.col("kind") != "pot")
    frame, _ = sets.sft_set_frame(
        data["instructions"], data["answers"], no_pot, data["seeds"], data["sft_answers"],
        SftSetParams(pot_ratio=1.0), _held_out(data),
    )  # fmt: skip
    assert set(frame["kind"]) == {"cot"} and frame.height == 12


def test_prm_steps_labels_by_labeller(data):
    frame, stats = sets.prm_steps_frame(
        data["step_labels"],
        data["instructions"],
        data["solutions"],
        PrmStepsParams(),
        _held_out(data),
    )
    assert frame.schema == PrmExample.schema()
    # 36 CoT solutions; s4's two seed solutions have null consensus labels: left out.
    assert stats["left_out"] == {"unlabelled": 2} and frame.height == 34
    bad = frame.filter(pl.col("id") == "s0.r1.a:1").row(0, named=True)
    assert bad["completions"] == ["Step 1: 3 + 5 = 9.", "Step 2: 9 + 2 = 11.", "The answer is: 11"]
    assert bad["labels"] == [False, False, False] and bad["first_error"] == 0
    good = frame.filter(pl.col("id") == "s0.r1.a:0").row(0, named=True)
    assert good["labels"] == [True, True, True] and good["first_error"] is None
    assert stats["steps"] == stats["steps_correct"] + stats["steps_wrong"]
    # Another labeller: the judge column labels s4's seed solutions too.
    judged, stats = sets.prm_steps_frame(
        data["step_labels"], data["instructions"], data["solutions"],
        PrmStepsParams(labeller="mc_soft", mc_threshold=0.5), _held_out(data),
    )  # fmt: skip
    assert judged.height == 36 and set(judged["labeller"]) == {"mc_soft"}


def test_prm_steps_rejects_gaps_in_step_index(data):
    broken = data["step_labels"].filter(
        ~((pl.col("solution_id") == "s1:0") & (pl.col("step_index") == 0))
    )
    with pytest.raises(ValueError, match=r"solution 's1:0': step_index is \[1\]"):
        sets.prm_steps_frame(broken, data["instructions"], None, PrmStepsParams(), frozenset())


def test_rl_prompts_labels_and_judge_r_i(data):
    frame, stats = sets.rl_prompts_frame(
        data["seeds"], data["instructions"], data["answers"], data["rewards"],
        RlPromptsParams(), _held_out(data),
    )  # fmt: skip
    assert frame.schema == RlPrompt.schema()
    assert stats["by_label_source"] == {"majority": 6, "reference": 6}
    assert stats["left_out"] == {"unverified": 6} and stats["with_r_i"] == 12
    rows = {r["id"]: r for r in frame.to_dicts()}
    assert rows["s0"]["label"] == "8" and rows["s0"]["parent"] is None
    assert rows["s0.r1.a"]["parent"] == "What is 3 + 5?" and rows["s0.r1.a"]["label"] == "10"
    assert rows["s2.r1.a"]["r_i"] == pytest.approx(0.6)
    no_seeds, stats = sets.rl_prompts_frame(
        data["seeds"], data["instructions"], data["answers"], None,
        RlPromptsParams(include_seeds=False), _held_out(data),
    )  # fmt: skip
    assert set(no_seeds["round"]) == {1} and no_seeds["r_i"].null_count() == no_seeds.height


def test_irm_set_renders_the_parent_and_checks_rows(data):
    frame, _stats = sets.irm_set_frame(data["irm_pairs"], data["instructions"], _held_out(data))
    assert frame.schema == IrmExample.schema() and frame.height == 6
    row = frame.row(0, named=True)
    assert row["prompt"].endswith(
        "### Original instruction:\nWhat is 3 + 5?\n\n### Evolved instruction:\n"
    )
    assert row["parent"] == "What is 3 + 5?" and row["root_id"] == "s0"
    orphan = data["irm_pairs"].with_columns(pl.lit("nope").alias("parent_id"))
    with pytest.raises(ValueError, match="parent 'nope' is not in instructions"):
        sets.irm_set_frame(orphan, data["instructions"], frozenset())
    negative = data["irm_pairs"].with_columns(pl.lit(-1.0).alias("margin"))
    with pytest.raises(ValueError, match=r"margin -1\.0 is negative"):
        sets.irm_set_frame(negative, data["instructions"], frozenset())


def test_every_set_holds_out_the_same_seeds_with_their_lineage(data):
    held = _held_out(data)
    assert 0 < len(held) < 6
    built = [
        sets.sft_set_frame(data["instructions"], data["answers"], data["solutions"], data["seeds"], data["sft_answers"], SftSetParams(), held)[0],
        sets.irm_set_frame(data["irm_pairs"], data["instructions"], held)[0],
        sets.prm_steps_frame(data["step_labels"], data["instructions"], data["solutions"], PrmStepsParams(), held)[0],
        sets.rl_prompts_frame(data["seeds"], data["instructions"], data["answers"], data["rewards"], RlPromptsParams(), held)[0],
    ]  # fmt: skip
    for frame in built:
        test_roots = set(frame.filter(pl.col("split") == "test")["root_id"])
        train_roots = set(frame.filter(pl.col("split") == "train")["root_id"])
        assert test_roots <= held and not (train_roots & held)
        assert test_roots and train_roots


def test_stages_write_versions_with_split_stats(evolforge_home):
    store = DatasetStore(home())
    refs = write_all(store)
    result = sets.build_sft_set.run(
        seeds=refs["seeds"], instructions=refs["instructions"], sft_answers=refs["sft_answers"],
        solutions=refs["solutions"], answers=refs["answers"], split=SPLIT, params=SftSetParams(),
    )  # fmt: skip
    stats = result.stats
    assert stats["train"] + stats["test"] == stats["rows"] == store.manifest(result["sft_set"]).rows
    assert stats["test_roots"] >= 1 and stats["train_roots"] >= 1
    again = sets.build_sft_set.run(
        seeds=refs["seeds"], instructions=refs["instructions"], sft_answers=refs["sft_answers"],
        solutions=refs["solutions"], answers=refs["answers"], split=SPLIT, params=SftSetParams(),
    )  # fmt: skip
    assert again.cached and again.refs == result.refs
    prm = sets.build_prm_steps.run(
        step_labels=refs["step_labels"], instructions=refs["instructions"], solutions=None,
        split=SPLIT, params=PrmStepsParams(),
    )  # fmt: skip
    assert store.read(prm["prm_steps"]).height == prm.stats["rows"]


# -- trl's own dataset preparation accepts the sets ------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.tasks.training.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def _args(config_cls, tmp_path, **extra):
    return config_cls(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        report_to="none",
        activation_checkpointing=False,
        **extra,
    )


def test_trl_sft_trainer_reads_the_sft_set_as_prompt_completion(data, tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    from trl.data_utils import is_conversational

    from tasks.training.sft import prompt_completion_dataset

    frame, _ = sets.sft_set_frame(
        data["instructions"], data["answers"], data["solutions"], data["seeds"],
        data["sft_answers"], SftSetParams(pot_ratio=0.5), frozenset(),
    )  # fmt: skip
    dataset = prompt_completion_dataset(frame)
    assert not is_conversational(dataset[0])
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny),
        args=_args(SFTConfig, tmp_path, max_length=256),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert trainer.completion_only_loss  # trl detected the prompt-completion format
    first = trainer.train_dataset[0]
    labels = [t for t, m in zip(first["input_ids"], first["labels"], strict=True) if m != -100]
    # Only the completion (and the eos trl appends) carries labels.
    assert (
        tokenizer.decode(labels).strip() == (frame["completion"][0] + tokenizer.eos_token).strip()
    )


def test_trl_reward_trainer_reads_the_irm_set_with_margins(data, tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from tasks.training.irm import IrmTrainParams, preference_dataset

    frame, _ = sets.irm_set_frame(data["irm_pairs"], data["instructions"], frozenset())
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    trainer = RewardTrainer(
        model=model,
        args=_args(RewardConfig, tmp_path, max_length=256),
        train_dataset=preference_dataset(frame, IrmTrainParams()),
        processing_class=tokenizer,
    )
    assert trainer.train_dataset.num_rows == frame.height
    example = trainer.train_dataset[0]
    assert tokenizer.decode(example["chosen_ids"]).startswith(frame["prompt"][0].rstrip())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert batch["margin"].tolist() == [1.0, 1.0]


def test_long_irm_pairs_are_shortened_not_dropped_by_trl(data, tiny, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from tasks.training.irm import IrmTrainParams, preference_dataset

    frame, _ = sets.irm_set_frame(data["irm_pairs"], data["instructions"], frozenset())
    long = frame.with_columns(
        (pl.col("chosen") + " and then" * 120).alias("chosen"),
        (pl.col("rejected") + " or else" * 90).alias("rejected"),
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    params = IrmTrainParams(max_length=64)
    trainer = RewardTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1),
        args=_args(RewardConfig, tmp_path, max_length=64),
        train_dataset=preference_dataset(long, params, tokenizer),
        processing_class=tokenizer,
    )
    assert trainer.train_dataset.num_rows == long.height  # trl would have dropped them all
    assert all(len(row["chosen_ids"]) <= 64 for row in trainer.train_dataset)


def test_trl_grpo_trainer_reads_the_rl_prompts(data, tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tasks.training.rl import prompt_dataset

    frame, _ = sets.rl_prompts_frame(
        data["seeds"], data["instructions"], data["answers"], data["rewards"],
        RlPromptsParams(), frozenset(),
    )  # fmt: skip
    dataset = prompt_dataset(frame)
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny),
        reward_funcs=[lambda prompts, completions, **kw: [0.0] * len(prompts)],
        args=_args(GRPOConfig, tmp_path, num_generations=2, per_device_train_batch_size=2),
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(tiny, padding_side="left"),
    )
    # The extra columns stay: trl hands them to the reward function as keyword lists.
    assert set(trainer.train_dataset.column_names) == {
        "prompt",
        "instruction",
        "parent",
        "label",
        "r_i",
    }
