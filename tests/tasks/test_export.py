"""Training sets as Hugging Face datasets (train/test splits) and the push to the hub: a real
code path that fails with one clear line when the hub is off or unreachable."""

from __future__ import annotations

import polars as pl
import pytest

from tasks import export
from tasks.export import HubError, hf_dataset, push_to_hub

FRAME = pl.DataFrame(
    {
        "prompt": ["p1", "p2", "p3"],
        "completions": [["a", "b"], ["c"], ["d"]],
        "labels": [[True, None], [False], [True]],
        "split": ["train", "test", "train"],
    }
)


def test_a_split_column_becomes_train_and_test_splits():
    ds = hf_dataset(FRAME, "evolforge prm_steps@abc")
    assert sorted(ds) == ["test", "train"]
    assert ds["train"].num_rows == 2 and "split" not in ds["train"].column_names
    assert ds["train"][0]["labels"] == [True, None]
    assert ds["test"].info.description == "evolforge prm_steps@abc"
    flat = hf_dataset(FRAME.drop("split"))
    assert flat.num_rows == 3


def test_push_fails_with_one_line_when_the_hub_is_off(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as info:
        push_to_hub(FRAME, "someone/prm-steps")
    message = str(info.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message and "someone/prm-steps" in message
    with pytest.raises(HubError, match="not a repo id"):
        push_to_hub(FRAME, "not a repo!")


def test_push_sends_the_splits_and_reports_failures_in_one_line(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    pushed = []

    def fake_push(self, repo, **kwargs):
        pushed.append((sorted(self), repo, kwargs["private"], kwargs["commit_message"]))

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fake_push)
    url = push_to_hub(
        FRAME, "someone/prm-steps", private=True, description="evolforge prm_steps@abc"
    )
    assert url == "https://huggingface.co/datasets/someone/prm-steps"
    assert pushed == [(["test", "train"], "someone/prm-steps", True, "evolforge prm_steps@abc")]

    def unreachable(self, repo, **kwargs):
        raise ConnectionError("Max retries exceeded with url: /api/repos/create\n(more detail)")

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", unreachable)
    with pytest.raises(HubError) as info:
        push_to_hub(FRAME, "someone/prm-steps")
    assert str(info.value) == (
        "push to the hub (someone/prm-steps) failed: ConnectionError: Max retries exceeded with "
        "url: /api/repos/create"
    )
    assert export.hub_offline() is False
